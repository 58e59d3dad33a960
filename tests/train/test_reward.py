"""The reward-model trainer on the tiny model: it learns the marker on held-out pairs (the untrained
model does not), resumes exactly, centres its rewards, and its scorer combines and gates models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic import preference_records, read_metrics, write_config, write_jsonl

from cai.train import config as train_config
from cai.train import reward
from cai.train.data import load_preferences


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm-data")
    return {
        "train": write_jsonl(root / "train.jsonl", preference_records(60, answers_per_prompt=3, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", preference_records(30, seed=1)),
    }


def make_config(tmp_path: Path, tiny_model: Path, prefs, name: str = "rm", sets: list[str] = (), **doc):
    base = {
        "model": str(tiny_model),
        "data": {"train": str(prefs["train"]), "eval": str(prefs["eval"])},
        "output_dir": str(tmp_path / name),
        "max_steps": 30,
        "batch_size": 4,
        "lr": 1e-3,
        "max_length": 128,
        "save_every": 10,
    }
    return train_config.load("rm", write_config(tmp_path / f"{name}.yaml", **{**base, **doc}), list(sets))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model: Path, prefs) -> train_config.TrainConfig:
    cfg = make_config(tmp_path_factory.mktemp("rm-run"), tiny_model, prefs)
    reward.train(cfg)
    return cfg


def test_reward_model_learns_the_marker(trained) -> None:
    evals = read_metrics(trained.output_dir, "eval")
    untrained, final = evals[0]["accuracy"], evals[30]["accuracy"]
    assert 0.25 <= untrained <= 0.75  # a random head: chance on 30 held-out pairs
    assert final >= 0.95
    train = read_metrics(trained.output_dir)
    assert sum(train[s]["loss"] for s in (28, 29, 30)) / 3 < train[1]["loss"] - 0.3
    assert (trained.output_dir / "curves.png").exists()


def test_offset_centres_the_training_rewards(trained) -> None:
    final = trained.output_dir / "final"
    summary = json.loads((final / "reward.json").read_text())
    assert summary["train_answers"] == 60 * 3 and summary["eval_accuracy"] >= 0.95
    pairs = load_preferences(trained.train_data)
    answers = {}  # distinct (prompt, answer) of the training data
    for p in pairs:
        for a in (p.chosen, p.rejected):
            answers[json.dumps([p.prompt, a])] = (p.prompt, a[-1]["content"])
    scorer = reward.RewardScorer({"rm": (final, 1.0)})
    prompts, texts = zip(*answers.values())
    scores = scorer.score(list(prompts), list(texts))
    assert len(scores) == 180
    assert abs(scores.mean().item()) < 1e-4
    assert abs(summary["offset"]) > 1e-3  # the offset did something


def test_eval_pairs_and_scorer_combination(trained) -> None:
    final = trained.output_dir / "final"
    pairs = load_preferences(trained.eval_data)
    report = reward.evaluate_pairs(reward.RewardScorer({"rm": (final, 1.0)}), pairs)
    assert report["n"] == 30 and report["accuracy"] >= 0.95 and report["mean_margin"] > 1.0
    low, high = report["accuracy_ci95"]
    assert low < report["accuracy"] <= high

    prompts = [p.prompt for p in pairs[:6]]
    answers = [p.chosen[-1]["content"] for p in pairs[:3]] + [p.rejected[-1]["content"] for p in pairs[3:6]]
    one = reward.RewardScorer({"rm": (final, 1.0)}).score(prompts, answers)
    two = reward.RewardScorer({"helpful": (final, 0.25), "safety": (final, 0.5)})
    assert torch.allclose(two.score(prompts, answers), 0.75 * one, atol=1e-5)
    # gate: where the safety score is below 0, it alone is the reward
    gated = reward.RewardScorer({"helpful": (final, 0.25), "safety": (final, 0.5)}, gate=("safety", 0.0)).score(
        prompts, answers
    )
    expected = torch.where(one < 0, one, 0.75 * one)
    assert torch.allclose(gated, expected, atol=1e-5)
    assert (one < 0).any() and (one >= 0).any()  # both branches taken


def test_resume_gives_the_uninterrupted_losses(tmp_path: Path, tiny_model: Path, prefs) -> None:
    sets = ["max_steps=6", "save_every=3", "rm.use_soft_labels=true", "rm.center_coef=0.01"]
    straight = make_config(tmp_path, tiny_model, prefs, "straight", sets)
    reward.train(straight)
    killed = make_config(tmp_path, tiny_model, prefs, "killed", sets)
    reward.train(killed, stop_after=4)
    reward.train(killed)
    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_rewards_equal_each_answer_alone(tiny_model: Path, prefs, lora: bool) -> None:
    """K answers of a prompt in one row, the prompt once: the rewards of the answers scored one by one,
    for groups of 3 answers, of 2, and of 1; under LoRA too (PEFT wraps the head)."""
    from transformers import AutoModelForSequenceClassification

    from cai.train import data, runtime

    tokenizer = runtime.load_tokenizer(str(tiny_model))
    pad_id = data.pad_id(tokenizer)
    torch.manual_seed(0)  # the head is freshly initialised: random, not zero
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=pad_id).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False)
        )
    groups, _ = data.group_pairs(tokenizer, load_preferences(prefs["train"], limit=12), max_length=128)
    answers = [groups[0].answers, groups[1].answers[:2], groups[2].answers[:1], groups[3].answers]
    assert [len(a) for a in answers] == [3, 2, 1, 3]
    with torch.no_grad():
        packed = reward.score_groups(model, answers, pad_id, "cpu")
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[:, 0] for group in answers for ids in group])
    assert packed.shape == (9,) and alone.std() > 1e-3
    assert torch.allclose(packed, alone, atol=1e-5), (packed, alone)


def test_margin_option_uses_the_margin_column(tmp_path: Path, tiny_model: Path, prefs) -> None:
    plain = make_config(tmp_path, tiny_model, prefs, "plain", ["max_steps=1"])
    with_margin = make_config(tmp_path, tiny_model, prefs, "margin", ["max_steps=1", "rm.use_margin=true"])
    reward.train(plain)
    reward.train(with_margin)
    # same model, same first batch: -log sigmoid(d - m) with m = 2 on most pairs is larger than -log sigmoid(d)
    assert read_metrics(with_margin.output_dir)[1]["loss"] > read_metrics(plain.output_dir)[1]["loss"] + 0.5
    assert read_metrics(with_margin.output_dir)[1]["reward_margin"] == pytest.approx(
        read_metrics(plain.output_dir)[1]["reward_margin"], abs=1e-6
    )


def test_pretraining_phase_then_the_main_pairs(tmp_path: Path, tiny_model: Path, prefs) -> None:
    """PMP: a phase on a generic comparison set (hard labels) in OUTPUT/pretrain, then the main phase from
    its model: two small steps on three prompts' pairs reach what the same steps from scratch do not. A
    rerun does not pretrain again."""
    generic = write_jsonl(
        tmp_path / "generic.jsonl",
        [
            {k: v for k, v in r.items() if k != "label_prob"}
            for r in preference_records(40, answers_per_prompt=3, seed=7)
        ],
    )
    small = write_jsonl(tmp_path / "small.jsonl", preference_records(3, seed=8))
    sets = ["max_steps=2", "lr=1e-5", "rm.use_soft_labels=true"]  # the main pairs' label_prob; the generic set has none
    plain = make_config(tmp_path, tiny_model, {"train": small, "eval": prefs["eval"]}, "plain", sets)
    pmp = make_config(
        tmp_path,
        tiny_model,
        {"train": small, "eval": prefs["eval"]},
        "pmp",
        sets,
        rm={"pretrain": {"data": str(generic), "max_steps": 20, "lr": 1e-3}},
    )
    reward.train(plain)
    reward.train(pmp)

    pretrained = read_metrics(pmp.output_dir / "pretrain", "eval")
    assert sorted(read_metrics(pmp.output_dir / "pretrain")) == list(range(1, 21))  # its own max_steps
    assert pretrained[0]["accuracy"] <= 0.75 and pretrained[20]["accuracy"] >= 0.9
    main = read_metrics(pmp.output_dir, "eval")
    assert main[0]["accuracy"] == pytest.approx(
        pretrained[20]["accuracy"]
    )  # the main phase starts from the pretrained model
    assert main[2]["accuracy"] >= 0.9 and read_metrics(plain.output_dir, "eval")[2]["accuracy"] <= 0.75

    # the pretraining phase's rewards are not centred (the main phase centres its own): no offset to compute
    assert json.loads((pmp.output_dir / "pretrain" / "final" / "reward.json").read_text())["offset"] is None
    assert json.loads((pmp.output_dir / "final" / "reward.json").read_text())["offset"] is not None
    pretrained_at = (pmp.output_dir / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns
    reward.train(pmp)
    assert (pmp.output_dir / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == pretrained_at
