"""The worker: one thread that starts queued jobs as processes (`cai run|eval|train ...` in the workspace,
through `python -m cai.service.child`, which ties each to the server's life), reaps them, and stops the ones asked to cancel. All process handling happens on this thread,
so there is one place that knows which jobs are alive."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cai.core.errors import InputError
from cai.generate.progress import PROGRESS_FILE_ENV
from cai.service.jobs import CANCELLED, FAILED, FINISHED, INTERRUPTED, QUEUED, RUNNING, Job, JobStore
from cai.service.progress import job_files

log = logging.getLogger("cai.serve")

JOB_MARKER_ENV = "CAI_JOB"  # in each job's environment: lets a restarted server recognise its orphans
CANCEL_GRACE_S = 30.0  # after SIGINT, how long a job gets to write what it has done before SIGKILL
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)


def secrets() -> list[str]:
    """Values of the server's environment variables named like secrets (labelers' API keys, the server
    token): scrubbed from job logs, which the API serves."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def job_environment(keys: list[str]) -> dict[str, str]:
    """The server's environment for a job: without the variables named like secrets (the server's
    tokens, cloud credentials), except `keys`, the API keys its checked backends send."""
    return {k: v for k, v in os.environ.items() if k in keys or not _SECRET_NAME.search(k)}


def redact(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, "***")
    return text


@dataclass
class _Running:
    proc: subprocess.Popen
    out_dir: str
    log_thread: threading.Thread
    signalled_at: float | None = None


class Worker:
    """`admit(job)` checks a job again as it starts (its files, or the server's backends, may have
    changed since it was queued) and returns the key variables it may be given; an error fails it."""

    def __init__(self, store: JobStore, root: Path, state_dir: Path, max_jobs: int, admit: Callable[[Job], list[str]]):
        self.store = store
        self.admit = admit
        self.root = root
        self.state_dir = state_dir
        self.max_jobs = max_jobs
        self.marker = str(store.path)
        self._running: dict[int, _Running] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cai-worker", daemon=True)

    def start(self) -> None:
        self._recover()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Graceful shutdown: running jobs get Ctrl-C and are left `interrupted`, to resume later."""
        self._stop.set()
        self._wake.set()
        self._thread.join()

    # -- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._signal_cancels()
                self._start_queued()
            except Exception:  # the thread must outlive any one bad job: its death would kill every job
                log.exception("worker step failed")
            self._wake.wait(0.25)
            self._wake.clear()
        self._shutdown()

    def _start_queued(self) -> None:
        busy = {r.out_dir for r in self._running.values()}
        for job in self.store.list(QUEUED):
            if len(self._running) >= self.max_jobs:
                return
            # Two processes on one run directory would both append its rows: same-folder jobs wait their turn.
            if job.out_dir in busy or not self.store.claim(job.id):
                continue
            busy.add(job.out_dir)
            self._launch(job)

    def _launch(self, job: Job) -> None:
        files = job_files(self.state_dir, job)
        files["folder"].mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "cai.service.child", str(os.getpid()), *job.command()]
        logfile = open(files["log"], "a", encoding="utf-8")
        logfile.write(f"--- attempt {job.attempts + 1}: cai {' '.join(job.command())}\n")
        logfile.flush()
        try:
            keys = self.admit(job)
        except Exception as exc:  # a job that cannot be checked does not start, whatever the reason
            error = exc.render() if isinstance(exc, InputError) else f"could not check the job: {exc}"
            with logfile:
                logfile.write(f"refused: {error}\n")
            self.store.end(job.id, FAILED, None, error)
            return
        env = {
            **job_environment(keys),
            PROGRESS_FILE_ENV: str(files["progress"]),
            JOB_MARKER_ENV: f"{self.marker}:{job.id}",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cancel reaches the engine's workers too
            )
        except OSError as exc:
            logfile.close()
            self.store.end(job.id, FAILED, None, f"could not start: {exc}")
            return
        self.store.set_pid(job.id, proc.pid)
        thread = threading.Thread(target=_copy_log, args=(proc, logfile, secrets()), daemon=True)
        thread.start()
        self._running[job.id] = _Running(proc, job.out_dir, thread)
        log.info("job %d started: cai %s", job.id, " ".join(job.command()))

    def _reap(self) -> None:
        for job_id, r in list(self._running.items()):
            code = r.proc.poll()
            if code is None:
                continue
            _kill_group(r.proc.pid)  # engine workers left behind by a crash
            r.log_thread.join(timeout=5)
            del self._running[job_id]
            job = self.store.get(job_id)
            if code == 0:
                status, error = FINISHED, None
            elif job.cancel_requested:
                status, error = CANCELLED, None
            else:
                status, error = FAILED, _last_line(job_files(self.state_dir, job)["log"]) or f"exit code {code}"
            self.store.end(job_id, status, code, error)
            log.info("job %d %s (exit code %s)", job_id, status, code)

    def _signal_cancels(self) -> None:
        for job_id, r in self._running.items():
            if r.signalled_at is None and self.store.get(job_id).cancel_requested:
                # Ctrl-C to the job itself: it keeps the rows (or checkpoints) done and exits 130, and a resume
                # continues from there. The engine's workers stop with it; SIGINT to all of them at
                # once could kill an engine mid-batch and log its rows as failures.
                _signal(r.proc.pid, signal.SIGINT)
                r.signalled_at = time.monotonic()
            elif r.signalled_at is not None and time.monotonic() - r.signalled_at > CANCEL_GRACE_S:
                _kill_group(r.proc.pid)

    def _shutdown(self) -> None:
        for r in self._running.values():
            _signal(r.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        for job_id, r in self._running.items():
            try:
                r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(r.proc.pid)
            self.store.end(job_id, INTERRUPTED, r.proc.poll(), "the server stopped while the job ran: resume it")

    def _recover(self) -> None:
        """Jobs still `running` in the database belong to a server that died: stop what is left of their
        processes, and mark them interrupted, to be resumed by request (their run directories resume)."""
        for job in self.store.list(RUNNING):
            if job.pid is not None and _ours(job.pid, f"{self.marker}:{job.id}"):
                _kill_group(job.pid)
            self.store.end(job.id, INTERRUPTED, None, "the server stopped while the job ran: resume it")
            log.info("job %d interrupted by a server restart", job.id)


def _copy_log(proc: subprocess.Popen, logfile, values: list[str]) -> None:
    with logfile:
        for line in iter(proc.stdout.readline, b""):
            logfile.write(redact(line.decode("utf-8", "replace"), values))
            logfile.flush()


def _last_line(path: Path) -> str | None:
    lines = (
        [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        if path.exists()
        else []
    )
    return lines[-1] if lines else None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ours(pid: int, marker: str) -> bool:
    """The process group is a job of this server: its leader carries our marker, or the leader is gone and
    only its engine workers are left (a group id is not reused while the group has members)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return f"{JOB_MARKER_ENV}={marker}".encode() in environ.split(b"\0")
