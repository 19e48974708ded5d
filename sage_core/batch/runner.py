"""The server pool: one worker per server takes the next job, follows it over the websocket, downloads its outputs
and records it; failed jobs are retried, lost servers restarted (ours) or dropped (the user's)."""
from __future__ import annotations

import copy
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .client import STATS_EVENT, ComfyClient, file_ext, output_refs
from .errors import JobError, ServerError
from .jobs import Job, attention_settings
from .manifest import Manifest, now_iso, save_new_file
from .progress import Progress
from .workflow import input_spec, output_nodes, title_of


@dataclass
class Slot:
    """One server of the pool."""

    client: ComfyClient
    object_info: dict
    local: object = None  # LocalServer when this command started it
    restarts: int = 0
    dead: bool = False
    jobs_done: int = 0
    current: str | None = None
    prompt_id: str | None = None

    @property
    def label(self) -> str:
        return self.client.label


@dataclass
class RunOptions:
    retries: int = 2
    job_timeout: float = 3600.0
    max_restarts: int = 2
    max_server_losses: int = 3
    include_temp: bool = False
    keep_prefix: bool = False
    prefix_root: str = "sage-batch"
    poll_interval: float = 1.0
    startup_timeout: float = 300.0


@dataclass
class Summary:
    ok: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    unrendered: list = field(default_factory=list)
    skipped: int = 0
    dropped_servers: list = field(default_factory=list)
    restarted: int = 0
    interrupted: bool = False


class BatchRunner:
    def __init__(self, jobs: list[Job], slots: list[Slot], manifest: Manifest, progress: Progress,
                 options: RunOptions | None = None, overridden_targets=()):
        self.pending = deque(jobs)
        self.slots = slots
        self.manifest = manifest
        self.progress = progress
        self.opt = options or RunOptions()
        self.overridden = {t.rsplit(".", 1)[-1] for t in overridden_targets}
        self.summary = Summary()
        self._cv = threading.Condition()
        self._in_flight = 0
        self._stop = threading.Event()

    # ------------------------------------------------------------------ pool
    def run(self) -> Summary:
        threads = [threading.Thread(target=self._worker, args=(slot,), name=f"sage-batch:{slot.label}", daemon=True)
                   for slot in self.slots]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self.stop()
            for t in threads:
                t.join(30)
        with self._cv:
            self.summary.unrendered = list(self.pending)
        return self.summary

    def stop(self) -> None:
        """Stop taking jobs and interrupt the ones running (nothing finished is lost: it is in the manifest)."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for slot in self.slots:
            if slot.prompt_id and not slot.dead:
                slot.client.interrupt(slot.prompt_id)

    def _take(self) -> Job | None:
        with self._cv:
            while True:
                if self._stop.is_set():
                    return None
                if self.pending:
                    self._in_flight += 1
                    return self.pending.popleft()
                if self._in_flight == 0:
                    return None
                self._cv.wait(0.5)

    def _give_back(self, job: Job | None, front=False) -> None:
        with self._cv:
            if job is not None:
                (self.pending.appendleft if front else self.pending.append)(job)
            self._in_flight -= 1
            self._cv.notify_all()

    def _worker(self, slot: Slot) -> None:
        while not self._stop.is_set():
            job = self._take()
            if job is None:
                break
            try:
                record = self._run_job(slot, job)
            except JobError as e:
                job.attempts += 1
                self._job_error(slot, job, str(e), e.details)
                continue
            except ServerError as e:
                if self._stop.is_set():
                    self._give_back(job, front=True)
                    break
                if self._server_still_up(slot):
                    job.attempts += 1
                    self._job_error(slot, job, str(e), None)
                    continue
                job.server_losses += 1
                job.errors.append(f"{slot.label}: server lost: {e}")
                if job.server_losses > self.opt.max_server_losses:
                    job.attempts = max(job.attempts, self.opt.retries) + 1
                    self._job_error(slot, job, f"lost its server {job.server_losses} times", None)
                else:
                    self._give_back(job, front=True)
                if not self._recover(slot, str(e)):
                    break
                continue
            except Exception as e:  # noqa: BLE001 - a bug or an odd answer must not stop the batch
                job.attempts += 1
                self._job_error(slot, job, f"{type(e).__name__}: {e}", None)
                continue
            self.manifest.append(record)
            slot.jobs_done += 1
            with self._cv:
                self.summary.ok.append(job.name)
            self.progress.job_finished(slot.label, job.name, True)
            self._give_back(None)
        slot.current = None
        slot.client.close_events()

    def _job_error(self, slot: Slot, job: Job, message: str, details) -> None:
        job.errors.append(f"{slot.label}: {message}")
        errors = list(job.errors)
        if job.attempts <= self.opt.retries and not self._stop.is_set():
            self.progress.job_requeued(slot.label, job.name, f"attempt {job.attempts} failed: {message}")
            self._give_back(job)
            return
        record = self._base_record(job, slot)
        record.update(status="failed", errors=errors, error_details=details)
        self.manifest.append(record)
        with self._cv:
            self.summary.failed.append(job.name)
        self.progress.job_finished(slot.label, job.name, False, message)
        self._give_back(None)

    def _server_still_up(self, slot: Slot) -> bool:
        if slot.local is not None and not slot.local.alive():
            return False
        for _ in range(3):
            if slot.client.alive(timeout=5):
                return True
            time.sleep(1.0)
        return False

    def _recover(self, slot: Slot, why: str) -> bool:
        """After a server was lost: restart it when this command started it, else drop it. False when dropped."""
        slot.client.close_events()
        if slot.local is not None and slot.restarts < self.opt.max_restarts and not self._stop.is_set():
            slot.restarts += 1
            self.progress.note(f"server {slot.label} lost ({why}); "
                               f"restarting it ({slot.restarts}/{self.opt.max_restarts})")
            try:
                slot.local.restart(timeout=self.opt.startup_timeout)
                with self._cv:
                    self.summary.restarted += 1
                return True
            except ServerError as e:
                self.progress.note(f"server {slot.label} did not come back: {e}")
        slot.dead = True
        with self._cv:
            self.summary.dropped_servers.append(slot.label)
        alive = [s.label for s in self.slots if not s.dead]
        self.progress.note(f"server {slot.label} dropped from the pool ({why}); "
                           + (f"going on with {', '.join(alive)}" if alive else "no server left"))
        return False

    # ------------------------------------------------------------------ one job
    def prepare_graph(self, job: Job, object_info: dict) -> dict:
        """The graph sent for a job: its own server-side file prefix on each save node (unless the user set one),
        so that servers sharing an output folder never race for a file name."""
        graph = copy.deepcopy(job.graph)
        if self.opt.keep_prefix or "filename_prefix" in self.overridden:
            return graph
        for nid in output_nodes(graph, object_info):
            node = graph[nid]
            spec = input_spec(object_info[node["class_type"]], "filename_prefix")
            if spec is not None and spec.type == "STRING" and isinstance(node["inputs"].get("filename_prefix"), str):
                node["inputs"]["filename_prefix"] = f"{self.opt.prefix_root}/{job.name}"
        return graph

    def _base_record(self, job: Job, slot: Slot) -> dict:
        return {"type": "job", "job": job.name, "index": job.index, "key": job.key, "status": None,
                "inputs": job.record_inputs(), "seed": job.seed, "server": slot.label, "attempts": job.attempts,
                "outputs": [], "attention": {"nodes": attention_settings(job.graph), "stats": []},
                "errors": list(job.errors), "recorded_at": now_iso()}

    def _run_job(self, slot: Slot, job: Job) -> dict:
        client = slot.client
        slot.current = job.name
        self.progress.job_started(slot.label, job.name)
        graph = self.prepare_graph(job, slot.object_info)
        if client.has_events and not client.events_open:
            client.connect_events()
        t_queue = time.time()
        queued_at = now_iso()
        prompt_id = client.queue_prompt(graph, extra={"sage_batch": {"job": job.name, "key": job.key}})
        slot.prompt_id = prompt_id
        stats, started, entry = [], None, None
        t_deadline = time.monotonic() + self.opt.job_timeout
        next_poll = time.monotonic() + (self.opt.poll_interval if client.events_open else 0.2)
        done = False
        try:
            while not done:
                if self._stop.is_set():
                    client.interrupt(prompt_id)
                    raise ServerError("batch stopped")
                if slot.local is not None and not slot.local.alive():
                    raise ServerError("the server process exited")
                if time.monotonic() > t_deadline:
                    client.interrupt(prompt_id)
                    raise JobError(f"timed out after {self.opt.job_timeout:.0f} s")
                if client.has_events and not client.events_open:
                    client.connect_events()  # reconnect; ServerError when the server is gone
                ev = client.next_event(0.5)
                if ev is not None:
                    kind, data = ev.get("type"), ev.get("data") or {}
                    pid = data.get("prompt_id") if isinstance(data, dict) else None
                    if kind == STATS_EVENT:
                        if pid in (None, prompt_id):
                            stats.append(data)
                        continue
                    if pid != prompt_id:
                        continue
                    if kind == "execution_start":
                        started = time.time()
                    elif kind == "progress":
                        node = data.get("node")
                        label = title_of(graph, str(node)) if node is not None and str(node) in graph else ""
                        self.progress.job_progress(slot.label, job.name, data.get("value", 0), data.get("max", 0),
                                                   label)
                    elif kind == "executing" and data.get("node") is None:
                        done = True
                    elif kind == "execution_success":
                        done = True
                    elif kind == "execution_error":
                        raise JobError(_exec_error_text(data), data)
                    elif kind == "execution_interrupted":
                        raise JobError("interrupted on the server", data)
                if time.monotonic() >= next_poll or done:
                    next_poll = time.monotonic() + (self.opt.poll_interval * 3 if client.events_open else 0.5)
                    entry = client.history(prompt_id)
                    if entry is not None:
                        status = entry.get("status") or {}
                        if status.get("status_str") == "error":
                            raise JobError(_history_error_text(status), status)
                        if status.get("completed") or entry.get("outputs"):
                            done = True
                    elif done:
                        done = False  # history not written yet
                        next_poll = time.monotonic() + 0.2
            t_done = time.time()
        finally:
            slot.prompt_id = None
        # saved files; a workflow that only previews (temp files) gets its previews
        refs = output_refs(entry, include_temp=self.opt.include_temp) or output_refs(entry, include_temp=True)
        if not refs:
            raise JobError("finished without writing any output file")
        outputs = []
        t_dl = time.time()
        multi = len(refs) > 1
        try:
            for k, (nid, ref) in enumerate(refs):
                stem = f"{job.name}_{nid}-{k}" if multi else job.name
                nbytes = []

                def write(fp, ref=ref, nbytes=nbytes):
                    nbytes.append(client.download(ref, fp))

                name = save_new_file(self.manifest.out_dir, stem, file_ext(ref), write)
                outputs.append({"file": name, "node": nid, "bytes": nbytes[0] if nbytes else None,
                                "server_file": {k2: ref.get(k2) for k2 in ("filename", "subfolder", "type")}})
        except BaseException:
            # a job is recorded whole or not at all: drop the files of this attempt, which no record names
            for o in outputs:
                try:
                    os.remove(os.path.join(self.manifest.out_dir, o["file"]))
                except OSError:
                    pass
            raise
        t_end = time.time()
        record = self._base_record(job, slot)
        record.update(
            status="ok", prompt_id=prompt_id, outputs=outputs,
            timings={"queued_at": queued_at,
                     "wait_s": round((started or t_queue) - t_queue, 3),
                     "run_s": round(t_done - (started or t_queue), 3),
                     "download_s": round(t_end - t_dl, 3),
                     "total_s": round(t_end - t_queue, 3)})
        record["attention"]["stats"] = stats
        return record


def _exec_error_text(data: dict) -> str:
    node = data.get("node_type") or data.get("node_id") or "?"
    return f"{node}: {data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}"[:2000]


def _history_error_text(status: dict) -> str:
    for msg in status.get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_error":
            return _exec_error_text(msg[1] or {})
    return "the server recorded an error"
