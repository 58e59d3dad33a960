"""The SFT trainer on the tiny model: the loss on assistant tokens falls, resume is exact, a datasets
folder of a cai run trains as its JSONL does."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import read_metrics, sft_records, write_config, write_jsonl

from cai.train import config as train_config
from cai.train import sft


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", sft_records(48))


def make_config(tmp_path: Path, tiny_model: Path, train: Path, name: str = "sft", sets: list[str] = (), **doc):
    base = {
        "model": str(tiny_model),
        "data": {"train": str(train), "eval_fraction": 0.25},
        "output_dir": str(tmp_path / name),
        "max_steps": 15,
        "batch_size": 4,
        "lr": 1e-3,
        "max_length": 64,
        "save_every": 5,
    }
    return train_config.load("sft", write_config(tmp_path / f"{name}.yaml", **{**base, **doc}), list(sets))


def test_sft_loss_falls(tmp_path: Path, tiny_model: Path, sft_data: Path) -> None:
    cfg = make_config(tmp_path, tiny_model, sft_data)
    final = sft.train(cfg)
    train, evals = read_metrics(cfg.output_dir), read_metrics(cfg.output_dir, "eval")
    assert train[15]["loss"] < train[1]["loss"] - 1.0
    assert evals[15]["loss"] < evals[0]["loss"] - 1.0  # held-out conversations
    assert (final / "model.safetensors").exists()


def test_resume_gives_the_uninterrupted_losses(tmp_path: Path, tiny_model: Path, sft_data: Path) -> None:
    sets = ["max_steps=6", "save_every=2", "grad_accum=2"]
    straight = make_config(tmp_path, tiny_model, sft_data, "straight", sets)
    sft.train(straight)
    killed = make_config(tmp_path, tiny_model, sft_data, "killed", sets)
    sft.train(killed, stop_after=3)
    sft.train(killed)
    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step


def test_datasets_folder_trains_like_its_jsonl(tmp_path: Path, tiny_model: Path, sft_data: Path) -> None:
    from datasets import load_dataset

    folder = tmp_path / "datasets" / "sft"
    load_dataset("json", data_files=str(sft_data), split="train").save_to_disk(str(folder))
    from_jsonl = make_config(tmp_path, tiny_model, sft_data, "from-jsonl", ["max_steps=2"])
    from_folder = make_config(tmp_path, tiny_model, folder, "from-folder", ["max_steps=2"])
    sft.train(from_jsonl)
    sft.train(from_folder)
    a, b = read_metrics(from_jsonl.output_dir), read_metrics(from_folder.output_dir)
    assert [a[s]["loss"] for s in (1, 2)] == pytest.approx([b[s]["loss"] for s in (1, 2)], abs=1e-6)
