"""Length-debiased reward-model training: the pair weights, the correlation term and ODIN's terms against
hand-computed values; on the tiny model, a preference task where length predicts the label in the training
pairs but not in the held-out ones (length_task.py): the plain reward model learns the length rule, the
length-balanced one and the decorrelated one do not; ODIN's two heads leave a one-head model; data.train
as a weighted list of files; bad keys exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from length_task import held_out_pairs, training_pairs
from safetensors.torch import load_file
from synthetic import read_metrics, write_config, write_jsonl

from cai.cli import EXIT_BAD_INPUT, main
from cai.train import config as train_config
from cai.train import data, reward
from cai.train.losses import (
    CorrelationWindow,
    length_balance_weights,
    length_correlation_penalty,
    odin_length_loss,
    orthogonality_loss,
    pearson_correlation,
    unit_mean,
)

# ----------------------------------------------------------------------------- the equations by hand


def test_length_balance_weights_by_hand() -> None:
    # three chosen-longer pairs (weights 1, 1, 2: W+ = 4), one chosen-shorter (W- = 1), one of equal length
    weights = length_balance_weights([5, 1, 3, -2, 0], [1.0, 1.0, 2.0, 1.0, 1.0])
    # W+ and W- each become (4 + 1) / 2 = 2.5: longer pairs x 2.5/4, the shorter one x 2.5, equal ones as they were
    assert weights == pytest.approx([0.625, 0.625, 1.25, 2.5, 1.0])
    assert sum(weights[:3]) == pytest.approx(sum(weights[3:4]))
    assert length_balance_weights([1, 2], [1.0, 3.0]) == [1.0, 3.0]  # no chosen-shorter pair: nothing to balance
    assert unit_mean(weights) == pytest.approx([w * 5 / 6 for w in weights])


def test_pair_weights_summary() -> None:
    weights, summary = data.pair_weights([1.0, 1.0, 1.0, 1.0], [4, 2, 7, -1], balance=True)
    assert weights == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])  # each side 2 of the total 4
    assert summary == {
        "length_balance": True,
        "chosen_longer": {"pairs": 3, "total_weight": 2.0},
        "chosen_shorter": {"pairs": 1, "total_weight": 2.0},
        "equal_length": {"pairs": 0, "total_weight": 0},
    }


def test_correlation_penalty_by_hand() -> None:
    preference = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    lengths = torch.tensor([1.0, 3.0, 2.0])
    # centred: x = (-4/3, -1/3, 5/3), y = (-1, 1, 0): sum xy = 1, sum x^2 = 42/9, sum y^2 = 2
    expected = 1 / (42 / 9 * 2) ** 0.5
    assert pearson_correlation(preference, lengths).item() == pytest.approx(expected, rel=1e-5)
    penalty = length_correlation_penalty(preference, -lengths, 0.5)  # the sign does not matter, the size does
    assert penalty.item() == pytest.approx(0.5 * expected, rel=1e-5)
    penalty.backward()
    assert torch.isfinite(preference.grad).all() and preference.grad.abs().sum() > 0
    constant = torch.ones(3, requires_grad=True)  # no spread: no correlation, and a finite gradient
    flat = length_correlation_penalty(constant, lengths, 1.0)
    flat.backward()
    assert flat.item() == 0.0 and torch.isfinite(constant.grad).all()
    assert length_correlation_penalty(torch.tensor([3.0]), torch.tensor([1.0]), 1.0).item() == 0.0


def test_windowed_correlation_penalty_by_hand() -> None:
    past_preference, past_lengths = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 2.0])
    preference = torch.tensor([1.0, 2.0], requires_grad=True)
    lengths = torch.tensor([2.0, 0.0])
    # over the 4 pairs: s = (0, 3, 1, 2), l = (0, 2, 2, 0), centred (-1.5, 1.5, -0.5, 0.5) and (-1, 1, 1, -1):
    # sum sl = 2, sum s^2 = 5, sum l^2 = 4, rho = 2 / sqrt(20); sigma_s = sqrt(5 / 4), sigma_l = 1
    rho = 2 / 20**0.5
    penalty = length_correlation_penalty(preference, lengths, 0.5, past_preference, past_lengths)
    assert penalty.item() == pytest.approx(0.5 * rho, rel=1e-5)
    penalty.backward()
    # pair i pulls with coef * sign(rho) * (l~_i - rho s~_i) / (b sigma_s), b = 2 pairs in the batch
    sigma = (5 / 4) ** 0.5
    standard_s, standard_l = torch.tensor([-0.5, 0.5]) / sigma, torch.tensor([1.0, -1.0])
    expected = 0.5 * (standard_l - rho * standard_s) / (2 * sigma)
    assert preference.grad.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # no past: the batch's own Pearson term, value and gradient
    alone = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    batch = torch.tensor([1.0, 3.0, 2.0])
    length_correlation_penalty(alone, batch, 0.5, torch.empty(0), torch.empty(0)).backward()
    reference = alone.detach().clone().requires_grad_()
    (0.5 * pearson_correlation(reference, batch).abs()).backward()
    assert alone.grad.tolist() == pytest.approx(reference.grad.tolist())


def test_correlation_window_keeps_the_last_pairs() -> None:
    window = CorrelationWindow(3)
    for start in (0.0, 2.0, 4.0):
        preference = torch.tensor([start, start + 1], requires_grad=True)
        window.penalty(preference, torch.tensor([start, -start]), 1.0)
    assert window.preference.tolist() == [3.0, 4.0, 5.0] and not window.preference.requires_grad
    assert window.length_diff.tolist() == [-2.0, 4.0, -4.0]
    # the batch is measured with the window's three pairs before it
    preference, lengths = torch.tensor([6.0, 7.0]), torch.tensor([1.0, 0.0])
    expected = length_correlation_penalty(preference, lengths, 1.0, window.preference, window.length_diff)
    # the signed correlation over the five pairs, the figure a trainer logs
    signed = pearson_correlation(torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0]), torch.tensor([-2.0, 4.0, -4.0, 1.0, 0.0]))
    term, correlation = window.penalty(preference, lengths, 1.0)
    assert term.item() == pytest.approx(expected.item()) == pytest.approx(abs(signed.item()))
    assert correlation == pytest.approx(signed.item())
    none = CorrelationWindow(0)  # the batch alone
    none.penalty(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), 1.0)
    assert none.preference.numel() == 0


def test_odin_terms_by_hand() -> None:
    lengths = torch.tensor([1.0, 2.0, 3.0])
    # quality anti-correlated with length (|rho| = 1), the length head perfectly correlated (rho = 1): 1 - 1
    assert odin_length_loss(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]), lengths).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    # quality uncorrelated (rho = 0), the length head anti-correlated (rho = -1): 0 + 1
    assert odin_length_loss(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([2.0, 1.0, 0.0]), lengths).item() == (
        pytest.approx(1.0, abs=1e-6)
    )
    assert orthogonality_loss(torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 1.0])).item() == pytest.approx(1.0)
    assert orthogonality_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])).item() == 0.0


def test_reward_figures_split_by_length() -> None:
    # pairs: (chosen reward, rejected reward, chosen length, rejected length)
    chosen = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0])
    rejected = torch.tensor([1.0, 2.0, 1.0, 0.0, 1.0])
    figures = reward.pair_figures(chosen, rejected, [9, 9, 2, 2, 5], [3, 3, 8, 8, 5])
    assert figures["accuracy"] == pytest.approx(2.5 / 5)  # the tie counts half
    # chosen longer: right, wrong; chosen shorter: wrong, right; equal lengths: left out
    assert (figures["chosen_longer_n"], figures["chosen_shorter_n"]) == (2, 2)
    assert figures["accuracy_chosen_longer"] == figures["accuracy_chosen_shorter"] == 0.5
    assert figures["length_balanced_accuracy"] == 0.5


# ----------------------------------------------------------------------------- the synthetic length task

STEPS = 40


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("length-task")
    return {
        "train": write_jsonl(root / "train.jsonl", training_pairs(160, marker=0.85)),
        "eval": write_jsonl(root / "eval.jsonl", held_out_pairs(40)),
    }


def rm_config(tmp_path: Path, tiny_model: Path, task, name: str, rm: dict | None = None, **doc):
    base = {
        "model": str(tiny_model),
        "data": {"train": str(task["train"]), "eval": str(task["eval"])},
        "output_dir": str(tmp_path / name),
        "max_steps": STEPS,
        "batch_size": 8,
        "lr": 1e-3,
        "max_length": 128,
        "save_every": 100,
        **({"rm": rm} if rm else {}),
    }
    return train_config.load("rm", write_config(tmp_path / f"{name}.yaml", **{**base, **doc}))


def held_out(cfg) -> dict:
    return json.loads((cfg.output_dir / "final" / reward.REWARD_FILE).read_text())["eval"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model: Path, task):
    # held-out chunks of 16, 16 and 8 pairs: the logged figures must still be the pooled ones
    cfg = rm_config(tmp_path_factory.mktemp("rm-plain"), tiny_model, task, "plain", eval_batch_size=16)
    reward.train(cfg)
    return cfg


def test_plain_reward_model_learns_the_length_rule(plain) -> None:
    figures = held_out(plain)
    assert figures["chosen_longer_n"] == figures["chosen_shorter_n"] == 20
    assert figures["accuracy_chosen_longer"] - figures["accuracy_chosen_shorter"] >= 0.6
    assert figures["length_balanced_accuracy"] <= 0.7
    final_eval = read_metrics(plain.output_dir, "eval")[STEPS]  # the split figures are in metrics.jsonl too
    assert final_eval["length_balanced_accuracy"] == pytest.approx(figures["length_balanced_accuracy"])
    assert final_eval["accuracy"] == pytest.approx(figures["accuracy"])
    assert final_eval["reward_margin"] == pytest.approx(figures["mean_margin"])
    assert final_eval["length_correlation"] > 0.5  # its reward margin follows the length difference


@pytest.mark.parametrize(
    "remedy", [{"length_balance": True}, {"length_coef": 1.0, "length_window": 32}], ids=["balance", "correlation"]
)
def test_debiased_reward_model_learns_the_marker(remedy, plain, tmp_path: Path, tiny_model: Path, task) -> None:
    cfg = rm_config(tmp_path, tiny_model, task, "debiased", remedy)
    reward.train(cfg)
    figures = held_out(cfg)
    assert abs(figures["accuracy_chosen_longer"] - figures["accuracy_chosen_shorter"]) <= 0.3
    assert figures["length_balanced_accuracy"] >= 0.75
    assert figures["length_balanced_accuracy"] >= held_out(plain)["length_balanced_accuracy"] + 0.15
    weights = json.loads((cfg.output_dir / "final" / reward.REWARD_FILE).read_text())["train_weights"]
    assert weights["length_balance"] == ("length_balance" in remedy)
    longer, shorter = weights["chosen_longer"], weights["chosen_shorter"]
    assert longer["pairs"] + shorter["pairs"] == 160 and longer["pairs"] > 4 * shorter["pairs"]
    if "length_balance" in remedy:
        assert longer["total_weight"] == pytest.approx(shorter["total_weight"]) == pytest.approx(80.0)


def test_two_heads_leave_a_one_head_reward_model(tmp_path: Path, tiny_model: Path, task) -> None:
    cfg = rm_config(tmp_path, tiny_model, task, "odin", {"heads": 2, "length_coef": 1.0}, max_steps=6)
    reward.train(cfg)
    final = cfg.output_dir / "final"
    assert len(json.loads((final / "config.json").read_text())["id2label"]) == 1
    (head,) = [v for k, v in load_file(final / "model.safetensors").items() if k.startswith("score.")]
    assert head.shape[0] == 1  # the quality head alone
    train = read_metrics(cfg.output_dir)
    assert {"length_loss", "orthogonality"} <= set(train[6])
    summary = json.loads((final / reward.REWARD_FILE).read_text())
    assert summary["heads"] == 2
    # the scorer loads it as any reward model, and its centred rewards are the quality head's
    pairs = data.load_preferences(task["eval"], limit=4)
    figures = reward.evaluate_pairs(reward.RewardScorer({"rm": (final, 1.0)}, device="cpu"), pairs)
    assert figures["n"] == 4 and "length_balanced_accuracy" in figures


# ----------------------------------------------------------------------------- data.train as weighted files


def test_weighted_list_of_files(tmp_path: Path, tiny_model: Path, task) -> None:
    other = write_jsonl(tmp_path / "other.jsonl", training_pairs(6, seed=5))
    cfg = rm_config(
        tmp_path,
        tiny_model,
        task,
        "mixed",
        data={
            "train": [{"path": str(task["train"])}, {"path": str(other), "weight": 2.5}],
            "limit": 10,
            "eval_fraction": 0,
        },
    )
    assert [(f.path, f.weight) for f in cfg.train_files] == [(task["train"], 1.0), (other, 2.5)]
    assert [field for field, _ in cfg.read_paths()][:2] == ["data.train[0].path", "data.train[1].path"]
    pairs, held = data.preference_splits(cfg)
    assert held == []
    assert [p.weight for p in pairs] == [1.0] * 10 + [2.5] * 6  # the first `limit` of each file
    groups, _ = data.group_pairs(
        reward.runtime.load_tokenizer(str(tiny_model)), pairs, cfg.max_length
    )  # a pair's weight travels with it into the loss
    weighted, summary = reward.weighted(groups, balance=False)
    flat = [w for g in weighted for w in g.weights]
    # mean 1, in the files' proportion (pairs of one prompt share a group, whichever file they come from)
    assert sorted(flat) == pytest.approx([16 / 25] * 10 + [2.5 * 16 / 25] * 6)


@pytest.mark.parametrize(
    "kind, edit, field",
    [
        ("rm", {"rm": {"heads": 3}}, "rm.heads"),
        ("rm", {"rm": {"length_coef": -1}}, "rm.length_coef"),
        ("rm", {"rm": {"orthogonal_coef": 1.0}}, "rm.orthogonal_coef"),
        ("rm", {"rm": {"length_coef": 0.5}, "batch_size": 2}, "rm.length_coef"),
        ("rm", {"rm": {"length_window": 16}}, "rm.length_window"),
        ("rm", {"rm": {"heads": 2, "length_coef": 1.0, "length_window": 16}}, "rm.length_window"),
        ("judge", {"judge": {"length_coef": 1.0, "length_window": -1}}, "judge.length_window"),
        ("judge", {"judge": {"length_balance": "yes"}}, "judge.length_balance"),
        ("judge", {"judge": {"length_coef": 1.0}, "batch_size": 3}, "judge.length_coef"),
        ("rm", {"data": {"train": [{"path": "missing.jsonl"}]}}, "data.train[0].path"),
        ("rm", {"data": {"train": [{"path": "train.jsonl", "weight": 0}]}}, "data.train"),
        ("sft", {"data": {"train": [{"path": "train.jsonl"}]}}, "data.train"),
    ],
    ids=[
        "heads",
        "length-coef",
        "orthogonal-one-head",
        "corr-batch",
        "window-without-coef",
        "window-two-heads",
        "window-negative",
        "balance-type",
        "judge-batch",
        "missing-file",
        "zero-weight",
        "list-for-sft",
    ],
)
def test_bad_keys_exit_2_naming_the_field(
    kind, edit, field, tmp_path: Path, tiny_model: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", training_pairs(4))
    doc = {"model": str(tiny_model), "data": {"train": "train.jsonl"}, "output_dir": "out", **edit}
    write_config(tmp_path / "train.yaml", **doc)
    code = main(["train", kind, "train.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith(f"train.yaml: {field}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_window_measures_the_correlation_beyond_a_small_batch(tmp_path: Path, tiny_model: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", training_pairs(4))
    doc = {
        "model": str(tiny_model),
        "data": {"train": str(tmp_path / "train.jsonl")},
        "output_dir": str(tmp_path / "out"),
    }
    judge = {"length_coef": 0.5, "length_window": 62}
    cfg = train_config.load("judge", write_config(tmp_path / "judge.yaml", **doc, batch_size=2, judge=judge))
    assert (cfg.judge.length_coef, cfg.judge.length_window) == (0.5, 62)
    # a config that turns a demo's term off sets both to 0
    off = {"length_coef": 0, "length_window": 0}
    cfg = train_config.load("judge", write_config(tmp_path / "off.yaml", **doc, batch_size=2, judge=off))
    assert (cfg.judge.length_coef, cfg.judge.length_window) == (0, 0)
