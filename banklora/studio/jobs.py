"""The studio's jobs: train, compare and export runs, each a `banklora` command in its own process.

The server owns the processes, not the page: closing the browser changes nothing, and a page
opened later reads the whole log and metrics again. One job runs at a time (the machine's cores
are all one run can use); further jobs wait in a queue. Each job is a JSON record in
<workspace>/jobs/<id>.json, rewritten atomically at every change, and a log <id>.log.

Stop is Ctrl-C: the run gets SIGINT, finishes its step, writes a checkpoint and exits 130; resume
starts `banklora train --resume` on the same run. When the server stops it stops the running job
the same way; a server that starts finds the jobs it left: one still running is watched until it
ends, one that ended without the server is judged by what it left on disk (a complete adapter:
done; a checkpoint: interrupted, resumable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from banklora import checkpoint, progress
from banklora.io import atomic_write_json
from banklora.modeling import is_adapter_dir
from banklora.studio.workspace import Workspace

log = logging.getLogger(__name__)

FINAL = ("done", "failed", "stopped", "interrupted", "cancelled")
POLL_S = 0.5
STOP_GRACE_S = 120  # a step of the 270M model on 2 cores takes ~10 s; its checkpoint a few more


@dataclass
class Job:
    id: str
    kind: str  # train | compare | export
    name: str  # the run's name (train), or a short title
    args: list[str]  # after `python -m banklora`
    output: str  # what it writes, relative to the workspace: runs/<name>, reports/<id>.json, exports/<id>/<dir>
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    pid: int | None = None
    error: str | None = None
    resumed_by: str | None = None
    stop_requested: bool = False  # a stop was sent: a second SIGINT would end the run without its checkpoint

    @classmethod
    def read(cls, path: Path) -> "Job":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in known})


class Jobs:
    """The queue and its one worker thread. `on_adapter(name, path)` is called when a train job
    leaves a complete adapter (the server hot-loads it)."""

    def __init__(self, workspace: Workspace, on_adapter: Callable[[str, Path], None] | None = None) -> None:
        self.workspace = workspace
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self._process: subprocess.Popen | None = None
        self._watched_pid: int | None = None  # a run a previous server started, still going
        self._finishing = False  # an ended export being zipped, outside the lock
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="banklora-studio-jobs", daemon=True)
        for path in sorted(workspace.jobs.glob("j-*.json")):
            job = Job.read(path)
            self.jobs[job.id] = job
        self.on_adapter = None  # adapters a previous server finished are in runs/ and load with the server
        self._recover()
        self.on_adapter = on_adapter

    # ------------------------------------------------------------------ the public side
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the worker; a running job is stopped as Ctrl-C stops it (a checkpoint for a
        training run) and is left interrupted, to be resumed by the next server."""
        self._stopping.set()
        self._thread.join(timeout=5)
        with self.lock:
            running = self._running()
            if running is None or self._process is None:  # a run the previous server started goes on, and is found again
                return
            if not running.stop_requested:
                self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        with self.lock:
            self._finish(running, self._process.returncode, interrupted=True)

    def next_id(self) -> str:
        """The id the next submitted job gets (call holding the lock, to name its files before submitting)."""
        return f"j-{1 + max((int(j.id[2:]) for j in self.jobs.values()), default=0):04d}"

    def submit(self, kind: str, name: str, args: list[str], output: str) -> Job:
        with self.lock:
            job = Job(self.next_id(), kind, name, args, output)
            self.jobs[job.id] = job
            self._save(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def listing(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, None unless queued."""
        if job.state != "queued":
            return None
        queued = sorted(j.id for j in self.jobs.values() if j.state == "queued")
        return queued.index(job.id) + 1

    def busy_with(self, output: str) -> Job | None:
        """An unfinished job that writes `output`."""
        return next((j for j in self.jobs.values() if j.output == output and j.state not in FINAL), None)

    def stop(self, job: Job) -> bool:
        """Cancel a queued job, or send a running one Ctrl-C (once: a second would skip its
        checkpoint). False when a stop was sent already."""
        with self.lock:
            if job.stop_requested:
                return False
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif self._process is not None and self._running() is job:
                self._process.send_signal(signal.SIGINT)
            elif job.pid is not None:
                try:
                    os.kill(job.pid, signal.SIGINT)  # a run the previous server started
                except ProcessLookupError:
                    pass  # it has just ended; the worker records how
            job.stop_requested = True
            self._save(job)
            return True

    def resumable(self, job: Job) -> bool:
        """A training run that ended without its adapter, has a checkpoint, and is its run's latest job."""
        latest = max((j.id for j in self.jobs.values() if j.output == job.output), default=job.id)
        return (job.kind == "train" and job.state in ("stopped", "interrupted", "failed", "cancelled") and job.id == latest
                and not is_adapter_dir(self.workspace.root / job.output) and checkpoint.latest(self.checkpoints(job)) is not None)

    def resume(self, job: Job) -> Job:
        with self.lock:
            args = [a for a in job.args if a not in ("--resume", "--no-resume")] + ["--resume"]
            new = self.submit("train", job.name, args, job.output)
            job.resumed_by = new.id
            self._save(job)
        return new

    # ------------------------------------------------------------------ files of a job
    def log_path(self, job: Job) -> Path:
        return self.workspace.jobs / f"{job.id}.log"

    def checkpoints(self, job: Job) -> Path:
        return self.workspace.root / f"{job.output}-checkpoints"

    def metrics(self, job: Job) -> list[dict]:
        """The run's metrics.jsonl records (train jobs): the checkpoint folder's while it runs, the adapter's after."""
        if job.kind != "train":
            return []
        for path in (self.checkpoints(job) / progress.METRICS_FILE, self.workspace.root / job.output / progress.METRICS_FILE):
            if path.is_file():
                return [r for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if (r := _record(line))]
        return []

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.lock:
                    self._tick()
            except Exception:  # a job's failure must not end the queue
                log.exception("studio job runner")
            self._stopping.wait(POLL_S)

    def _tick(self) -> None:
        running = self._running()
        if running is not None:
            if self._finishing:
                return
            if self._process is not None:
                code = self._process.poll()
                if code is not None:
                    self._finish(running, code)
            elif not (_alive(self._watched_pid) and _is_banklora(self._watched_pid)):  # its pid may go to another program
                self._finish(running, None)
            return
        queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.id)
        if queued:
            self._launch(queued[0])

    def _running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def _launch(self, job: Job) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="80", BANKLORA_LOG_LEVEL="INFO")  # the page's log box: compare's compact tables
        with self.log_path(job).open("ab") as out:
            # a session of its own: Ctrl-C in the server's terminal reaches the server, which stops the run itself
            self._process = subprocess.Popen([sys.executable, "-m", "banklora", *job.args], cwd=self.workspace.root,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        job.state, job.started, job.pid = "running", time.time(), self._process.pid
        self._save(job)
        log.info("studio: %s %s started (%s)", job.kind, job.name, job.id)

    def _finish(self, job: Job, code: int | None, interrupted: bool = False) -> None:
        """Record how a job ended: by its exit code, or (None: the process was not ours; < 0: killed)
        by what it left: an adapter, a report or an export is done, a checkpoint is resumable."""
        self._process, self._watched_pid = None, None
        job.ended, job.returncode, job.pid = time.time(), code, None
        output = self.workspace.root / job.output
        left = is_adapter_dir(output) if job.kind == "train" else output.exists()
        unknown = code is None or code < 0
        if code == 0 or (unknown and left):
            job.state = "done"
        elif code == 130 or (unknown and job.kind == "train" and checkpoint.latest(self.checkpoints(job)) is not None):
            job.state = "interrupted" if interrupted or unknown else "stopped"
        else:
            job.state = "failed"
            job.error = self._error_line(job) or (f"exit code {code}" if code is not None else "the run ended while the server was down")
        if job.state == "done" and job.kind == "export" and output.is_dir() and not any(output.glob("*.gguf")):
            job.state, self._finishing = "running", True  # a merged HF checkpoint downloads as one zip, made outside the lock
            threading.Thread(target=self._zip_then_done, args=(job, output), name="banklora-studio-zip", daemon=True).start()
            return
        self._ended(job)

    def _zip_then_done(self, job: Job, directory: Path) -> None:
        try:
            _zip(directory)
            state, error = "done", None
        except OSError as exc:
            state, error = "failed", f"the export is in {directory}, but its zip could not be written: {exc}"
        with self.lock:
            job.state, job.error, job.ended, self._finishing = state, error, time.time(), False
            self._ended(job)

    def _ended(self, job: Job) -> None:
        self._save(job)
        log.info("studio: %s %s %s", job.kind, job.name, job.state)
        if job.state == "done" and job.kind == "train" and self.on_adapter is not None:
            try:
                self.on_adapter(job.name, self.workspace.root / job.output)
            except Exception:
                log.exception("studio: could not load the new adapter %s", job.name)

    def _recover(self) -> None:
        """Jobs a previous server left running: watch the ones still going, judge the others."""
        for job in self.jobs.values():
            if job.state != "running":
                continue
            if _alive(job.pid) and _is_banklora(job.pid):
                self._watched_pid = job.pid
                log.info("studio: %s %s is still running (pid %d); watching it", job.kind, job.name, job.pid)
            else:
                self._finish(job, None, interrupted=True)

    def _error_line(self, job: Job) -> str | None:
        path = self.log_path(job)
        if not path.is_file():
            return None
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
        if starts:  # the CLI's error sentence, which the console wrapped over lines
            return " ".join(lines[starts[-1]:]).removeprefix("error:").strip()
        return lines[-1] if lines else None

    def _save(self, job: Job) -> None:
        atomic_write_json(self.workspace.jobs / f"{job.id}.json", dataclasses.asdict(job))


def _zip(directory: Path) -> Path:
    """directory.zip beside it, its files under the directory's name, stored uncompressed (weights
    do not compress); written under a temporary name and renamed, never half a zip."""
    target = directory.with_name(f"{directory.name}.zip")
    tmp = directory.with_name(f".{directory.name}.zip.part")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(directory.name) / path.relative_to(directory))
        return tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)


def _record(line: str) -> dict | None:
    """One metrics.jsonl record; None for a line being written or damaged."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and ") Z" in status.read_text())  # a zombie has ended


def _is_banklora(pid: int) -> bool:
    """The process is a banklora run (a pid the system may have given to another program since)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"banklora" in cmdline.read_bytes()
    except OSError:
        return sys.platform != "linux"  # no /proc: trust the pid
