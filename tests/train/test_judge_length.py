"""`cai train judge` on a preference task where length predicts the label in the training pairs but not in
the held-out ones (length_task.py): the plain judge learns the length rule (its held-out accuracies on
chosen-longer and chosen-shorter pairs far apart), the length-balanced judge does not; final/judge.json
keeps the split figures and the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from length_task import held_out_pairs, training_pairs
from synthetic import read_metrics, write_config, write_jsonl
from test_judge_train import CONSTITUTION

from cai.train import config as train_config
from cai.train import judge

STEPS = 24


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge-length-task")
    (root / "one.yaml").write_text(CONSTITUTION)
    return {
        "train": write_jsonl(root / "train.jsonl", training_pairs(160, marker=0.85)),
        "eval": write_jsonl(root / "eval.jsonl", held_out_pairs(40)),
        "constitution": root / "one.yaml",
    }


def trained(root: Path, tiny_model: Path, task, name: str, **options) -> dict:
    cfg = train_config.load(
        "judge",
        write_config(
            root / f"{name}.yaml",
            model=str(tiny_model),
            data={"train": str(task["train"]), "eval": str(task["eval"])},
            output_dir=str(root / name),
            max_steps=STEPS,
            batch_size=8,
            lr=1e-3,
            max_length=256,
            save_every=100,
            judge={"constitution": str(task["constitution"]), **options},
        ),
    )
    judge.train(cfg)
    return {
        "summary": json.loads((cfg.output_dir / "final" / judge.JUDGE_FILE).read_text()),
        "eval": read_metrics(cfg.output_dir, "eval"),
    }


def test_the_length_balanced_judge_does_not_learn_the_length_rule(tmp_path: Path, tiny_model: Path, task) -> None:
    plain = trained(tmp_path, tiny_model, task, "plain")
    after = plain["summary"]["after"]
    assert after["chosen_longer_n"] == after["chosen_shorter_n"] == 20
    assert after["accuracy_chosen_longer"] - after["accuracy_chosen_shorter"] >= 0.6  # the length rule
    assert after["length_balanced_accuracy"] <= 0.7
    assert plain["eval"][STEPS]["length_balanced_accuracy"] == after["length_balanced_accuracy"]

    balanced = trained(tmp_path, tiny_model, task, "balanced", length_balance=True)
    after = balanced["summary"]["after"]
    assert abs(after["accuracy_chosen_longer"] - after["accuracy_chosen_shorter"]) <= 0.3
    assert after["length_balanced_accuracy"] >= 0.75
    weights = balanced["summary"]["train_weights"]
    assert weights["length_balance"] is True
    assert weights["chosen_longer"]["pairs"] > 4 * weights["chosen_shorter"]["pairs"]
    assert weights["chosen_longer"]["total_weight"] == pytest.approx(weights["chosen_shorter"]["total_weight"])
