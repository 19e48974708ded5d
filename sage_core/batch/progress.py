"""Progress display: one bar for the batch and one per server (its current job), tqdm when installed."""
from __future__ import annotations

import os
import sys
import threading
import time

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


class Progress:
    """Thread-safe progress for a batch; `kind` is "auto" (tqdm on a terminal, else plain lines), "tqdm", "plain"
    or "none"."""

    def __init__(self, total: int, slots: list[str], kind: str = "auto", stream=None, done: int = 0):
        self.stream = stream or sys.stderr
        if kind == "auto":
            kind = "tqdm" if _tqdm is not None and getattr(self.stream, "isatty", lambda: False)() else "plain"
        if kind == "tqdm" and (_tqdm is None or _columns(self.stream) < 40):
            kind = "plain"
        self.kind = kind
        self.total = total
        self.done = done
        self.failed = 0
        self._lock = threading.Lock()
        self._last = {}
        self._bars = {}
        self._batch = None
        if kind == "tqdm":
            self._batch = _tqdm(total=total, initial=done, desc="batch", unit="job", position=0, file=self.stream,
                                dynamic_ncols=True, leave=True)
            for i, s in enumerate(slots):
                self._bars[s] = _tqdm(total=1, desc=f"{s}: idle", position=i + 1, file=self.stream,
                                      dynamic_ncols=True, leave=False, bar_format="{desc} {bar} {n_fmt}/{total_fmt}")

    def note(self, text: str) -> None:
        with self._lock:
            if self.kind == "tqdm" and self._batch is not None:
                self._batch.write(text, file=self.stream)
            elif self.kind != "none":
                print(text, file=self.stream, flush=True)

    def job_started(self, slot: str, job_name: str) -> None:
        with self._lock:
            if self.kind == "tqdm":
                bar = self._bars.get(slot)
                if bar is not None:
                    bar.reset(total=1)
                    bar.set_description_str(f"{slot}: {job_name}")
            elif self.kind == "plain":
                self._print(f"[{self.done}/{self.total}] {slot}: started {job_name}")

    def job_progress(self, slot: str, job_name: str, value, maximum, node_label: str = "") -> None:
        with self._lock:
            if self.kind == "tqdm":
                bar = self._bars.get(slot)
                if bar is not None and maximum:
                    bar.total = int(maximum)
                    bar.n = int(value)
                    bar.set_description_str(f"{slot}: {job_name} {node_label}".rstrip(), refresh=False)
                    bar.refresh()
            elif self.kind == "plain":
                now = time.monotonic()
                if value == maximum or now - self._last.get(slot, 0) >= 2.0:
                    self._last[slot] = now
                    self._print(f"[{self.done}/{self.total}] {slot}: {job_name} {node_label} {value}/{maximum}")

    def job_finished(self, slot: str, job_name: str, ok: bool, message: str = "") -> None:
        with self._lock:
            self.done += 1
            if not ok:
                self.failed += 1
            text = f"{'done' if ok else 'FAILED'} {job_name} on {slot}" + (f": {message}" if message else "")
            if self.kind == "tqdm":
                self._batch.update(1)
                self._batch.set_postfix_str(f"failed={self.failed}" if self.failed else "")
                bar = self._bars.get(slot)
                if bar is not None:
                    bar.reset(total=1)
                    bar.set_description_str(f"{slot}: idle")
                if not ok:
                    self._batch.write(text, file=self.stream)
            elif self.kind == "plain":
                self._print(f"[{self.done}/{self.total}] {text}")

    def job_requeued(self, slot: str, job_name: str, message: str) -> None:
        self.note(f"retry {job_name} ({slot}: {message})")

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            if self._batch is not None:
                self._batch.close()
            self._bars = {}
            self._batch = None

    def _print(self, text):
        print(text, file=self.stream, flush=True)


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
