"""The real vLLM OpenAI-compatible server on 127.0.0.1, for tests of the API backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

API_KEY = "sk-cai-test-0123456789abcdef"
KEY_ENV = "CAI_TEST_API_KEY"  # the variable the tests' pipelines name for it
SERVED_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_args(model: Path, kv_cache_bytes: int = 256 << 20) -> list[str]:
    """The engine flags that work here (CPU, float32, a small KV cache), for vLLM's server and its
    offline batch runner alike."""
    return [
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes),
        "--seed",
        "0",
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',  # as the local engine's default
    ]


class VLLMServer:
    def __init__(self, model: Path, log: Path, kv_cache_bytes: int = 256 << 20):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *engine_args(model, kv_cache_bytes),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        )

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server not healthy in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextmanager
def running(model: Path, log: Path) -> Iterator[VLLMServer]:
    """A server for `model`, healthy, stopped on the way out (a module fixture's body)."""
    server = VLLMServer(model, log)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
