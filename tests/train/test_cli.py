"""`cai train` and `cai eval-rm` through the real entry points: a SIGKILLed training process resumes
to the uninterrupted run's numbers; a NaN ends the command with one line and exit 1; eval-rm writes
its figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import preference_records, read_metrics, write_config, write_jsonl

from cai.cli import EXIT_FAILED, EXIT_OK, main
from cai.train import config as train_config
from cai.train import dpo


def dpo_config(tmp_path: Path, tiny_model: Path, train: Path, name: str, **doc) -> Path:
    base = {
        "model": str(tiny_model),
        "data": {"train": str(train), "eval_fraction": 0.2},
        "output_dir": str(tmp_path / name),
        "max_steps": 40,
        "batch_size": 2,
        "lr": 1e-4,
        "max_length": 64,
        "save_every": 1,
        "keep_checkpoints": 3,
    }
    return write_config(tmp_path / f"{name}.yaml", **{**base, **doc})


def test_sigkill_then_rerun_resumes_exactly(tmp_path: Path, tiny_model: Path) -> None:
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(40, seed=2))
    straight = dpo.train(train_config.load("dpo", dpo_config(tmp_path, tiny_model, train, "straight"))).parent

    config = dpo_config(tmp_path, tiny_model, train, "killed")
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai.cli", "train", "dpo", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    saved = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < 40, "the run was killed before it finished"

    assert main(["train", "dpo", str(config)]) == EXIT_OK

    expected, resumed = read_metrics(straight), read_metrics(out)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(saved[-1] + 1, 41):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
    assert (out / "final" / "model.safetensors").exists()


def test_nan_ends_the_command_with_one_line(tmp_path: Path, tiny_model: Path, monkeypatch, capsys) -> None:
    import torch

    train = write_jsonl(tmp_path / "prefs.jsonl", preference_records(10, seed=3))
    config = dpo_config(tmp_path, tiny_model, train, "nan", max_steps=5, save_every=2)
    real = dpo.dpo_loss
    steps = {"n": 0}

    def poisoned(*args, **kwargs):
        steps["n"] += torch.is_grad_enabled()
        losses, c, r = real(*args, **kwargs)
        return (losses * float("inf") if steps["n"] == 3 and torch.is_grad_enabled() else losses), c, r

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    assert main(["train", "dpo", str(config)]) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "cai train dpo: step 3: loss is inf; training stopped (last good checkpoint: "
    )
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").glob("step-*")] == ["step-2"]


def test_train_rm_from_a_datasets_folder_then_eval_rm(tmp_path: Path, tiny_model: Path, capsys) -> None:
    """A cai-format preference JSONL, loaded through `datasets` and saved as a run's datasets folder,
    trains a reward model; `cai eval-rm` then scores held-out HH-style transcripts."""
    from datasets import load_dataset

    jsonl = write_jsonl(tmp_path / "preferences.jsonl", preference_records(40, answers_per_prompt=3, seed=4))
    folder = tmp_path / "run" / "datasets" / "preferences"
    load_dataset("json", data_files=str(jsonl), split="train").save_to_disk(str(folder))
    config = write_config(
        tmp_path / "rm.yaml",
        model=str(tiny_model),
        data={"train": str(folder), "eval_fraction": 0.1},
        output_dir=str(tmp_path / "rm"),
        max_steps=25,
        batch_size=4,
        lr=1e-3,
        max_length=128,
        save_every=25,
        rm={"use_soft_labels": True},
    )
    assert main(["train", "rm", str(config)]) == EXIT_OK

    held_out = [
        {
            "chosen": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['chosen'][0]['content']}",
            "rejected": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['rejected'][0]['content']}",
        }
        for r in preference_records(30, seed=5)
    ]
    pairs = write_jsonl(tmp_path / "hh.jsonl", held_out)
    capsys.readouterr()
    assert (
        main(
            [
                "eval-rm",
                str(tmp_path / "rm" / "final"),
                str(pairs),
                "--limit",
                "20",
                "--json",
                str(tmp_path / "rm.json"),
            ]
        )
        == EXIT_OK
    )
    report = json.loads((tmp_path / "rm.json").read_text())
    assert {"n", "accuracy", "accuracy_ci95", "mean_margin", "length_balanced_accuracy"} <= set(report)
    assert report["n"] == 20 and report["accuracy"] >= 0.9 and report["mean_margin"] > 0
    assert report["chosen_longer_n"] + report["chosen_shorter_n"] == report["length_n"]
    out = capsys.readouterr().out
    assert "accuracy" in out and "length-balanced" in out
