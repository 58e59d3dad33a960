"""`accelerate launch --num_processes 2` on the CPU: each process trains on its own shard of the data,
and a run stopped after a checkpoint resumes where it stopped, on both processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import preference_records, read_metrics, sft_records, write_config, write_jsonl

LAUNCHER = Path(__file__).with_name("launch_recorded.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, config: Path, record: Path, stop_after: int) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(LAUNCHER),
        kind,
        str(config),
        str(record),
        str(stop_after),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]


def reads(record: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{record}.rank{rank}").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_read_different_shards_and_resume(tmp_path, tiny_model, kind):
    records = sft_records(32) if kind == "sft" else preference_records(32)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    output = tmp_path / "out"
    config = write_config(
        tmp_path / f"{kind}.yaml",
        model=str(tiny_model),
        data={"train": str(train), "eval_fraction": 0.0},
        output_dir=str(output),
        max_steps=4,
        batch_size=2,
        lr=1e-3,
        max_length=96,
        save_every=1,
        seed=3,
    )
    record = tmp_path / "reads"

    launch(kind, config, record, stop_after=2)  # as a kill right after step 2's checkpoint
    launch(kind, config, record, stop_after=0)

    first, second = reads(record, 0), reads(record, 1)
    # each process read steps 1-2, then the resumed run read steps 3-4: no batch again, none skipped
    assert [r["position"] for r in first] == [r["position"] for r in second] == [0, 1, 2, 3]
    for mine, theirs in zip(first, second):
        assert mine["indexes"] and not set(mine["indexes"]) & set(theirs["indexes"])  # disjoint shards
    assert len({i for r in first + second for i in r["indexes"]}) == 4 * 2 * 2
    assert sorted(read_metrics(output)) == [1, 2, 3, 4]
    assert (output / "final" / "model.safetensors").exists()
