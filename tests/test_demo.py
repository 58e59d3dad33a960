"""pipelines/demo.yaml end to end on the embedded SmolLM2 model, through the installed `cai` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from locations import ROOT

pytestmark = pytest.mark.slow


def test_demo_pipeline(cai_home, tmp_path):
    from datasets import load_from_disk

    cai = Path(sys.executable).parent / "cai"
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [str(cai), "run", "pipelines/demo.yaml", "--limit", "4", "--run-dir", str(run_dir)],
        cwd=ROOT,
        env={**os.environ, "CAI_HOME": str(cai_home)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows done: 4/4, rows failed: 0" in proc.stdout
    assert "rows/s" in proc.stderr and "tok/s" in proc.stderr  # the progress bars
    rows = [json.loads(x) for x in (run_dir / "datasets" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["response"] and r["rounds"][0]["critique"] for r in rows)
    sft = load_from_disk(str(run_dir / "datasets" / "sft"))
    assert sft.num_rows == sum(not r["flags"] for r in rows)
    for item in sft:
        assert item["messages"][0]["role"] == "user" and item["messages"][-1]["role"] == "assistant"
        assert item["messages"][-1]["content"].strip()
