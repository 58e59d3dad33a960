"""`cai run` says which key goes to which host before it sends anything, unless the host is this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from api_server import free_port
from pipeline_files import ROOT


def test_cai_run_names_each_key_that_leaves_this_machine_before_any_backend_starts(tmp_path):
    near = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: the run stops at its first backend
    far = ["https://api.example.com/v1", "https://user:password@eu.example.com:8443/v1"]
    pipeline = {
        "name": "keys",
        "seed": 1,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": str(ROOT / "prompts" / "red_team_demo.jsonl"),
        "backends": {
            "near": {
                "type": "openai",
                "model": "m",
                "base_url": near,
                "api_key_env": "CAI_TEST_NEAR_KEY",
                "max_retries": 0,
            },
            # its key is not set: were it ever started, it would stop before sending anything
            "far": {"type": "openai", "model": "m", "base_url": far, "api_key_env": "CAI_TEST_FAR_KEY"},
            "unused": {
                "type": "openai",
                "model": "m",
                "base_url": "https://other.example.com/v1",
                "api_key_env": "CAI_TEST_OTHER_KEY",
            },
        },
        "roles": {"responder": "near", "critic": "far", "reviser": "far"},
        "stages": [{"type": "respond", "max_tokens": 4}, {"type": "critique_revise", "max_tokens": 4}],
    }
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(pipeline))
    env = {k: v for k, v in os.environ.items() if k != "CAI_TEST_FAR_KEY"} | {"CAI_TEST_NEAR_KEY": "sk-near-0123456789"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cai.cli",
            "run",
            str(tmp_path / "keys.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
            "--limit",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("cai run: ")]
    assert lines[0] == "cai run: backend 'far' sends $CAI_TEST_FAR_KEY to api.example.com, eu.example.com:8443"
    assert (
        "backend 'near'" in lines[1] and "failed to start" in lines[1]
    )  # after the notice, the loopback backend's own error
    assert "password" not in run.stderr and "sk-near" not in run.stderr and "other.example.com" not in run.stderr
