"""The JSON-lines manifest next to the outputs, resume bookkeeping, and never-overwriting output files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import uuid

MANIFEST_NAME = "manifest.jsonl"
PART_SUFFIX = ".sage-part"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Manifest:
    """Append-only JSON lines: one `batch` line per run, one `job` line per finished job (ok or failed).

    The last `job` line of a key is that job's state; a line cut short by a kill is ignored when reading.
    """

    def __init__(self, out_dir, name=MANIFEST_NAME):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, name)
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return os.path.isfile(self.path) and os.path.getsize(self.path) > 0

    def records(self) -> list[dict]:
        out = []
        if not os.path.isfile(self.path):
            return out
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def job_states(self) -> dict:
        """key -> the last job record of that key."""
        states = {}
        for rec in self.records():
            if rec.get("type") == "job" and rec.get("key"):
                states[rec["key"]] = rec
        return states

    def completed_keys(self) -> set:
        """Keys whose last record is ok and whose output files are all still there."""
        done = set()
        for key, rec in self.job_states().items():
            if rec.get("status") == "ok" and rec.get("outputs") and all(
                os.path.isfile(os.path.join(self.out_dir, o.get("file", ""))) for o in rec["outputs"]
            ):
                done.add(key)
        return done

    def known_files(self) -> set:
        files = set()
        for rec in self.records():
            for o in rec.get("outputs") or []:
                if o.get("file"):
                    files.add(o["file"])
        return files

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            os.makedirs(self.out_dir, exist_ok=True)
            # a previous run killed mid-line leaves no newline: start on a fresh line
            needs_nl = False
            if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_nl = f.read(1) != b"\n"
            with open(self.path, "a", encoding="utf-8") as f:
                if needs_nl:
                    f.write("\n")
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


def clean_partials(out_dir) -> int:
    """Remove download leftovers of an interrupted run (never a finished file)."""
    n = 0
    if not os.path.isdir(out_dir):
        return 0
    for name in os.listdir(out_dir):
        if name.endswith(PART_SUFFIX) and name.startswith("."):
            try:
                os.remove(os.path.join(out_dir, name))
                n += 1
            except OSError:
                pass
    return n


def save_new_file(out_dir, stem: str, ext: str, write) -> str:
    """Write a file through `write(fp)` under `stem+ext`, or `stem-1+ext`, ... if that name is taken.

    The data goes to a hidden part file first and is then linked to its final name, which fails rather than
    replaces when the name exists: an existing file is never overwritten, and a final name never holds half a file.
    Returns the file name (relative to out_dir).
    """
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{stem}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
    try:
        with open(tmp, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        for n in range(10000):
            name = f"{stem}{'' if n == 0 else f'-{n}'}{ext}"
            final = os.path.join(out_dir, name)
            try:
                os.link(tmp, final)
                return name
            except FileExistsError:
                continue
            except OSError:
                # no hard links here: exclusive create and copy
                try:
                    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "wb") as dst, open(tmp, "rb") as src:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        dst.write(chunk)
                return name
        raise OSError(f"no free file name for {stem}{ext} in {out_dir}")
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
