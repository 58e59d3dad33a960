"""Padding-free batches (`packing: true`) for SFT, DPO and the reward model: best-fit decreasing bins, a plan that
resumes, packed rows whose per-example log-probs are the unpacked ones, and the options' checks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from synthetic import preference_records, read_metrics, sft_records, write_config, write_jsonl

from cai.core.errors import InputError
from cai.train import config as train_config
from cai.train import data, dpo, reward, sft
from cai.train.data import PackedBatches
from cai.train.losses import token_logps
from cai.train.packing import best_fit_decreasing, rows


def test_best_fit_decreasing_puts_each_item_in_the_fullest_bin_it_fits():
    lengths = [5, 4, 3, 3, 2, 1]
    # 5 opens bin 0 (3 left), 4 opens bin 1 (4 left), 3 fills bin 0, 3 goes to bin 1 (1 left),
    # 2 fits nowhere and opens bin 2, 1 goes to the fullest bin it fits: bin 1
    assert best_fit_decreasing(lengths, list(range(6)), 8) == [[0, 2], [1, 3, 5], [4]]

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, list(range(300)), 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 128 + 1  # near the lower bound on bins


def test_packed_batches_are_a_function_of_seed_and_epoch_and_split_over_processes():
    lengths = [random.Random(i).randint(5, 60) for i in range(50)]
    batches = PackedBatches(lengths, 128, 2, seed=7)
    first = [batches(p) for p in range(3 * batches.per_epoch)]
    assert all(len(rows([lengths[i] for i in batch], 128)) <= 2 for batch in first)  # two rows a batch
    resumed = PackedBatches(lengths, 128, 2, seed=7)
    assert [resumed(p) for p in range(batches.per_epoch + 1, 2 * batches.per_epoch)] == first[
        batches.per_epoch + 1 : 2 * batches.per_epoch
    ]
    for epoch in range(3):
        items = first[epoch * batches.per_epoch : (epoch + 1) * batches.per_epoch]
        assert sorted(i for b in items for i in b) == list(range(50))  # every example once an epoch
    assert first[: batches.per_epoch] != first[batches.per_epoch : 2 * batches.per_epoch]
    ranks = [PackedBatches(lengths, 128, 2, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].per_epoch == ranks[1].per_epoch == batches.per_epoch // 2
    mine = [set(i for p in range(r.per_epoch) for i in r(p)) for r in ranks]
    assert not mine[0] & mine[1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_its_unpacked_log_probs_and_loss(tiny_model, attention):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
    items = [data.encode(tokenizer, r["messages"]) for r in sft_records(3, seed=4)]
    pad_id = data.pad_id(tokenizer)

    packed = sft.packed_batch(items, pad_id, attention, capacity=1000)  # one row
    mask = packed.pop("mask")
    assert packed["input_ids"].shape[0] == 1
    logp = token_logps(model(**packed).logits, packed["input_ids"])[0]
    start = 0
    for item in items:
        alone = token_logps(model(input_ids=torch.tensor([item.input_ids])).logits, torch.tensor([item.input_ids]))[0]
        assert torch.allclose(logp[start : start + len(item.input_ids) - 1], alone, atol=1e-5)
        start += len(item.input_ids)

    padded = data.collate(items, pad_id)
    padded_logp = token_logps(
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["input_ids"]
    )
    padded_mask = padded["mask"][:, 1:].float()
    packed_loss = -(logp * mask[0, 1:]).sum() / mask[0, 1:].sum()
    padded_loss = -(padded_logp * padded_mask).sum() / padded_mask.sum()
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)

    # rows capped at the longest item: each holds what fits, the loss the same
    longest = max(len(e.input_ids) for e in items)
    rowed = sft.packed_batch(items, pad_id, attention, capacity=longest)
    row_mask = rowed.pop("mask")[:, 1:].float()
    assert rowed["input_ids"].shape[1] == longest  # no row past the capacity
    row_logp = token_logps(model(**rowed).logits, rowed["input_ids"])
    assert (-(row_logp * row_mask).sum() / row_mask.sum()).item() == pytest.approx(padded_loss.item(), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_pairs_give_their_unpacked_log_probs(tmp_path, tiny_model, attention):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
    pairs = data.load_preferences(write_jsonl(tmp_path / "pairs.jsonl", preference_records(5, seed=2)))
    encoded, _ = data.encode_pairs(tokenizer, pairs, 128)
    pad_id = data.pad_id(tokenizer)

    padded = dpo.pair_logps(model, encoded, pad_id, "cpu", attention=attention)
    for capacity in (10_000, 128):  # every pair in one row; rows of two answers at most
        packed = dpo.pair_logps(model, encoded, pad_id, "cpu", capacity=capacity, attention=attention)
        for side in (0, 1):
            assert torch.allclose(packed[side], padded[side], atol=1e-4), capacity
    one_row = data.collate_pairs(encoded, pad_id, capacity=10_000)
    assert one_row["input_ids"].shape[0] == 1 and (one_row["input_ids"] != pad_id).all()  # no pads at all
    assert data.collate_pairs(encoded, pad_id, capacity=128)["input_ids"].shape[0] > 1


def test_packed_groups_give_their_unpacked_rewards(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pad_id = data.pad_id(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=pad_id)
    pairs = data.load_preferences(write_jsonl(tmp_path / "pairs.jsonl", preference_records(6, seed=2)))
    groups = [g.answers for g in data.group_pairs(tokenizer, pairs, 128)[0]]

    with torch.no_grad():
        padded = reward.score_groups(model, groups, pad_id, "cpu")
        for capacity in (10_000, 256):  # every group in one row; rows of two groups or so
            packed = reward.score_groups(model, groups, pad_id, "cpu", capacity=capacity)
            assert torch.allclose(packed, padded, atol=1e-4), capacity
    one_row = data.collate_groups(groups, pad_id, capacity=10_000)
    assert one_row["input_ids"].shape[0] == 1 and (one_row["input_ids"] != pad_id).all()  # no pads at all
    assert one_row["input_ids"].shape[1] == sum(data.group_length(g) for g in groups)


def packed_pairs_run(tmp_path: Path, tiny_model: Path, kind: str, trainer, **doc) -> tuple[dict, dict, dict]:
    """A packed run on preference pairs, straight and stopped after step 3 then resumed: the metrics of
    each (train), and the straight run's held-out ones."""
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_records(40, seed=0))

    def config(name):
        return packed_config(tmp_path, tiny_model, name, kind=kind, train=train, max_steps=6, **doc)

    trainer.train(config("straight"))
    killed = config("killed")
    trainer.train(killed, stop_after=3)
    trainer.train(killed)
    expected, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert all(resumed[s]["loss"] == pytest.approx(expected[s]["loss"], abs=1e-6) for s in range(1, 7))
    return expected, resumed, read_metrics(tmp_path / "straight", "eval")


def test_packed_rm_learns_and_resumes_exactly(tmp_path, tiny_model):
    _, _, evals = packed_pairs_run(tmp_path, tiny_model, "rm", reward, max_tokens_per_batch=384)
    assert evals[6]["accuracy"] > evals[0]["accuracy"]


def packed_config(
    tmp_path: Path,
    tiny_model: Path,
    name: str,
    sets: list[str] = (),
    kind: str = "sft",
    train: Path | None = None,
    **doc,
):
    """A packed training of the tiny model (sft on 40 records unless `train` says otherwise), a held-out
    fifth, a checkpoint every 2 steps."""
    base = {
        "model": str(tiny_model),
        "data": {"train": str(train or write_jsonl(tmp_path / "sft.jsonl", sft_records(40))), "eval_fraction": 0.2},
        "output_dir": str(tmp_path / name),
        "max_steps": 8,
        "lr": 1e-3,
        "max_length": 64,
        "save_every": 2,
        "packing": True,
        "max_tokens_per_batch": 160,
        **doc,
    }
    return train_config.load(kind, write_config(tmp_path / f"{name}.yaml", **base), list(sets))


def test_packed_sft_learns_and_resumes_exactly(tmp_path, tiny_model):
    straight = packed_config(tmp_path, tiny_model, "straight")
    sft.train(straight)
    killed = packed_config(tmp_path, tiny_model, "killed")
    sft.train(killed, stop_after=3)
    sft.train(killed)

    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    assert all(resumed[s]["loss"] == pytest.approx(expected[s]["loss"], abs=1e-6) for s in range(1, 9))
    assert all(expected[s]["tokens"] <= 160 for s in expected)
    assert read_metrics(straight.output_dir, "eval")[8]["loss"] < read_metrics(straight.output_dir, "eval")[0]["loss"]


def test_packed_dpo_starts_at_log_2_learns_and_resumes_exactly(tmp_path, tiny_model):
    expected, _, evals = packed_pairs_run(tmp_path, tiny_model, "dpo", dpo, max_tokens_per_batch=300, dpo={"beta": 0.1})
    assert expected[1]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert evals[6]["reward_margin"] > evals[0]["reward_margin"]


@pytest.mark.parametrize(
    ("kind", "doc", "field", "says"),
    [
        ("judge", {"packing": True}, "packing", "`cai train judge` cannot pack batches"),
        ("dpo", {"packing": True, "dpo": {"loss_type": "kto"}}, "packing", "kto"),
        ("dpo", {"packing": True, "max_tokens_per_batch": 100}, "max_tokens_per_batch", "2 x max_length (128)"),
        ("dpo", {"attn_implementation": "flash_attention_2"}, "attn_implementation", "shares each prompt"),
        ("sft", {"max_tokens_per_batch": 256}, "max_tokens_per_batch", "an option of packing: true"),
        ("sft", {"packing": True, "max_tokens_per_batch": 32}, "max_tokens_per_batch", "at least max_length (64)"),
    ],
)
def test_packing_options_that_cannot_work_name_the_field(tmp_path, tiny_model, kind, doc, field, says):
    path = write_config(
        tmp_path / "bad.yaml",
        model=str(tiny_model),
        data={"train": str(write_jsonl(tmp_path / "sft.jsonl", sft_records(4)))},
        output_dir=str(tmp_path / "out"),
        max_length=64,
        **doc,
    )
    with pytest.raises(InputError) as error:
        train_config.load(kind, path)
    assert error.value.field == field and says in str(error.value)
