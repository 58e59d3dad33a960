"""Train configs: the shipped examples validate, defaults follow the trainer, paths resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import write_config, write_jsonl

from cai.train import config as train_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind, name", [("sft", "sft_demo"), ("rm", "rm_demo"), ("dpo", "dpo_demo")])
def test_example_configs_validate(kind: str, name: str, tmp_path: Path, tiny_model: Path) -> None:
    """The examples read a demo run's datasets, which a fresh checkout has not made: point them at a file."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": []}])
    cfg = train_config.load(kind, ROOT / "train" / f"{name}.yaml", [f"data.train={data}", f"model={tiny_model}"])
    assert cfg.kind == kind and cfg.train_data == data and cfg.max_steps == 40
    assert cfg.output_dir == Path(f"runs/train/{kind}")


def test_defaults_follow_the_trainer_and_paths_resolve(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "configs" / "prefs.jsonl", [])
    path = write_config(
        tmp_path / "configs" / "c.yaml", model=str(tiny_model), data={"train": "prefs.jsonl"}, output_dir="out"
    )
    dpo = train_config.load("dpo", path)
    assert dpo.train_data == tmp_path / "configs" / "prefs.jsonl"  # beside the config file
    assert (dpo.lr, dpo.dpo.beta, dpo.dpo.loss_type, dpo.eval_fraction, dpo.precision) == (
        1e-6,
        0.1,
        "sigmoid",
        0.1,
        "auto",
    )
    assert train_config.load("sft", path).lr == 2e-5
    assert train_config.load("rm", path, ["lr=3e-4"]).lr == 3e-4  # YAML 1.1 alone would read a string


def test_changed_keys_ignore_what_a_resume_may_change() -> None:
    recorded = {"lr": 1e-5, "save_every": 10, "dpo": {"beta": 0.1}}
    assert train_config.changed_keys(recorded, {**recorded, "save_every": 5, "tensorboard": True}) == []
    assert train_config.changed_keys(recorded, {**recorded, "dpo": {"beta": 0.2}, "max_steps": 3}) == [
        "dpo",
        "max_steps",
    ]
