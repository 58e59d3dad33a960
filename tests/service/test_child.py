"""A job the server starts (through cai.service.child) stops on SIGINT, keeping its rows and exiting 130,
also when the server was started with SIGINT ignored, as `nohup cai serve &` from a script starts it:
the server cancels and stops its jobs with SIGINT, and a job that ignored it would be killed instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from canned_server import CannedServer
from generate.test_pipeline import wait_for_rows
from generate.test_streaming import api_pipeline, write_prompts

# the server's side of the exec: SIGINT ignored, as a background job of a shell script has it
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_a_job_stops_on_sigint_when_its_server_ignores_it(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 100_000)
    with CannedServer("--median-s", "0.01", "--sigma", "0") as server:
        pipeline = api_pipeline(tmp_path, server.url, prompts, rows_in_flight=8)
        run_dir = tmp_path / "run"
        job = ["run", str(pipeline), "--run-dir", str(run_dir), "--quiet"]
        proc = subprocess.Popen(
            [sys.executable, "-c", IGNORING_SIGINT, "-m", "cai.service.child", str(os.getpid()), *job],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            wait_for_rows(run_dir, "critique_revise", 8, proc)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130 and "rerun the same command to resume" in proc.stderr.read()
