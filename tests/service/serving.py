"""A real `cai serve` process on 127.0.0.1 over a workspace, and a small client for it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_server import free_port

TOKEN = "test-token-0123456789"
READ_TOKEN = "read-only-token-0123456789"  # CAI_SERVER_READ_TOKEN of the servers that have one
EVAL_KEY_ENV, EVAL_KEY = "CAI_TEST_EVAL_KEY", "sk-eval-0123456789abcdef"  # the eval server's declared backend's key
LIMIT = 12  # prompts per run: six batches of two per stage, so a job is mid-run for a while


class Server:
    def __init__(
        self,
        workspace: Path,
        log: Path,
        max_jobs: int = 1,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.workspace = workspace
        self.log = log
        self.max_jobs = max_jobs
        self.args = args  # more `cai serve` options
        self.env = env or {}  # more variables in the server's environment
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "cai.cli",
            "serve",
            "--workspace",
            str(self.workspace),
            "--port",
            str(self.port),
            "--max-jobs",
            str(self.max_jobs),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "CAI_SERVER_TOKEN": TOKEN, **self.env},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cai serve exited: {self.log.read_text()[-3000:]}")
            try:
                if self.client().get("/api/jobs").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"cai serve did not answer: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    # -- helpers the tests share

    def submit(self, pipeline: str = "tiny.yaml", **body) -> dict:
        return self.queue("run", {"pipeline": pipeline, **body})

    def submit_eval(self, eval_file: str = "eval.yaml", **body) -> dict:
        return self.queue("eval", {"eval": eval_file, **body})

    def queue(self, kind: str, body: dict) -> dict:
        response = self.client().post(f"/api/jobs/{kind}", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def job_ids(self) -> set[int]:
        return {j["id"] for j in self.client().get("/api/jobs").json()}

    def job(self, job_id: int) -> dict:
        return self.client().get(f"/api/jobs/{job_id}").json()

    def wait(self, job_id: int, until, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached the condition: {job}\n{self.log.read_text()[-2000:]}")

    def wait_ended(self, job_id: int, timeout: float = 600) -> dict:
        return self.wait(job_id, lambda j: j["status"] not in ("queued", "running"), timeout)

    def events(self, job_id: int) -> list[tuple[str, dict]]:
        """The job's SSE stream, read until the server ends it."""
        out, name = [], None
        with self.client().stream("GET", f"/api/jobs/{job_id}/events", timeout=600) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    out.append((name, json.loads(line[6:])))
        return out


def fifo_has_reader(path: Path) -> bool:
    """Whether some process has the FIFO open for reading (or waits in open()). Opening it for writing
    also lets such a reader go on (it reads end of file when we close)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    os.close(fd)
    return True
