"""The DPO trainer on the tiny model: it learns the synthetic preference, resumes exactly, stops on NaN; the
other loss types (CPL, SimPO, ORPO, KTO on pairs and on unpaired rows) and their option checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic import preference_records, read_metrics, write_config, write_jsonl

from cai.core.errors import InputError
from cai.train import config as train_config
from cai.train import dpo
from cai.train.runtime import NonFiniteError


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo-data")
    return {
        "train": write_jsonl(root / "train.jsonl", preference_records(40, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", preference_records(16, seed=1)),
    }


def make_config(
    tmp_path: Path, tiny_model: Path, prefs: dict[str, Path], name: str = "run", sets: list[str] = (), **doc
):
    base = {
        "model": str(tiny_model),
        "data": {"train": str(prefs["train"]), "eval": str(prefs["eval"])},
        "output_dir": str(tmp_path / name),
        "max_steps": 12,
        "batch_size": 4,
        "lr": 1e-4,
        "max_length": 128,
        "save_every": 4,
        "dpo": {"beta": 0.1},
    }
    path = write_config(tmp_path / f"{name}.yaml", **{**base, **doc})
    return train_config.load("dpo", path, list(sets))


def test_dpo_learns_the_marker(tmp_path: Path, tiny_model: Path, prefs) -> None:
    cfg = make_config(tmp_path, tiny_model, prefs, max_steps=20)
    final = dpo.train(cfg)

    train = read_metrics(cfg.output_dir)
    assert train[1]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert train[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert sum(train[s]["loss"] for s in (18, 19, 20)) / 3 < train[1]["loss"] - 0.1
    evals = read_metrics(cfg.output_dir, "eval")
    assert evals[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evals[20]["reward_margin"] > 0.2 and evals[20]["reward_accuracy"] >= 0.9  # held-out pairs
    assert {"chosen_reward", "rejected_reward", "kl_estimate", "grad_norm", "lr"} <= set(train[20])

    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert (cfg.output_dir / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (cfg.output_dir / "checkpoints").iterdir()) == [
        "step-16",
        "step-20",
    ]  # keep_checkpoints: 2
    assert json.loads((cfg.output_dir / "config.json").read_text())["kind"] == "dpo"


def test_cpl_learns_the_marker_without_a_reference(tmp_path: Path, tiny_model: Path, prefs, monkeypatch) -> None:
    """loss_type cpl: the same loop, no reference model loaded; held-out chosen answers become the
    likelier ones."""
    from transformers import AutoModelForCausalLM

    loaded = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a) or real(*a, **k))
    cfg = make_config(
        tmp_path, tiny_model, prefs, max_steps=20, lr=1e-3, dpo={"beta": 0.1, "loss_type": "cpl", "cpl_lambda": 0.5}
    )
    dpo.train(cfg)
    assert len(loaded) == 1  # the policy only

    train, evals = read_metrics(cfg.output_dir), read_metrics(cfg.output_dir, "eval")
    assert "kl_estimate" not in train[1]
    assert sum(train[s]["loss"] for s in (18, 19, 20)) / 3 < train[1]["loss"] - 0.1
    # the scores are alpha log pi, not log-ratios: at the start the answers' lengths decide, not the marker
    assert evals[0]["reward_accuracy"] < 0.5 and evals[20]["reward_accuracy"] >= 0.8
    assert evals[20]["reward_margin"] > evals[0]["reward_margin"] + 1.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_gives_the_uninterrupted_losses(tmp_path: Path, tiny_model: Path, prefs, lora: bool) -> None:
    # grad_accum 2 and an odd stop: the resumed run restarts mid-way from step 4's checkpoint
    sets = ["grad_accum=2", "max_steps=8"] + (["lora.r=4", "lora.dropout=0.1", "lr=1e-3"] if lora else [])
    straight = make_config(tmp_path, tiny_model, prefs, "straight", sets)
    dpo.train(straight)
    killed = make_config(tmp_path, tiny_model, prefs, "killed", sets)
    dpo.train(killed, stop_after=6)  # steps 5 and 6 ran but were never saved
    assert sorted(p.name for p in (killed.output_dir / "checkpoints").iterdir()) == ["step-4"]
    assert max(read_metrics(killed.output_dir)) == 6

    dpo.train(killed)

    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    assert sorted(resumed) == list(range(1, 9))  # steps 5, 6 logged once, by the resumed run
    for step in range(1, 9):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
        assert resumed[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path, tiny_model: Path, prefs, monkeypatch) -> None:
    cfg = make_config(tmp_path, tiny_model, prefs, sets=["save_every=2"])
    calls = {"n": 0}
    real = dpo.dpo_loss

    def poisoned(*args, **kwargs):
        losses, chosen, rejected = real(*args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # training batches only, not evaluation
        if calls["n"] == 4 and torch.is_grad_enabled():
            losses = losses + float("nan")
        return losses, chosen, rejected

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    with pytest.raises(
        NonFiniteError, match=r"step 4: loss is nan; training stopped \(last good checkpoint: .*step-2\)"
    ):
        dpo.train(cfg)
    assert sorted(p.name for p in (cfg.output_dir / "checkpoints").iterdir()) == ["step-2"]
    assert not (cfg.output_dir / "final").exists()


def test_lora_with_precomputed_reference_and_soft_labels(tmp_path: Path, tiny_model: Path, prefs) -> None:
    cfg = make_config(
        tmp_path,
        tiny_model,
        prefs,
        max_steps=6,
        lr=1e-3,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        dpo={"beta": 0.1, "use_soft_labels": True, "precompute_ref": True},
    )
    final = dpo.train(cfg)
    assert (cfg.output_dir / "reference_logps.pt").exists()
    train = read_metrics(cfg.output_dir)
    # soft labels p = 0.9 (0.6 on the good-vs-good pairs): at h = 0 the loss is still log 2
    assert train[1]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert train[6]["reward_margin"] > train[1]["reward_margin"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final)  # a plain model: the adapter is merged in
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_lora_with_a_named_reference_uses_that_model(tmp_path: Path, tiny_model: Path, prefs) -> None:
    """Under LoRA the adapter-off policy is the reference only when `dpo.reference` names none: a named
    one is loaded, so at step 1 (adapter still zero) policy and reference already differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-reference"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    named = make_config(tmp_path, tiny_model, prefs, "named", max_steps=1, lora=lora, dpo={"reference": str(other)})
    dpo.train(named)
    assert abs(read_metrics(named.output_dir)[1]["reward_margin"]) > 1e-3
    own = make_config(tmp_path, tiny_model, prefs, "own", max_steps=1, lora=lora)
    dpo.train(own)
    assert read_metrics(own.output_dir)[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_resume_with_another_config_is_refused(tmp_path: Path, tiny_model: Path, prefs) -> None:
    cfg = make_config(tmp_path, tiny_model, prefs, sets=["max_steps=2"])
    dpo.train(cfg)
    with pytest.raises(InputError, match="lr: differs from the run in"):
        dpo.train(make_config(tmp_path, tiny_model, prefs, sets=["max_steps=2", "lr=0.5"]))
    # what does not touch the weights or the data order may change
    dpo.train(make_config(tmp_path, tiny_model, prefs, sets=["max_steps=2", "save_every=1"]))


def test_packed_pairs_give_the_log_probs_of_separate_sequences(tiny_model: Path) -> None:
    """One row per pair with the prompt once (and a 4D mask) must equal scoring chosen and rejected apart."""
    from synthetic import preference_records
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.train import data
    from cai.train.losses import token_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    records = preference_records(5, seed=3)
    records[1]["prompt"] = [
        {"role": "user", "content": "a much longer question " * 12}
    ]  # prompts of different lengths in one batch
    pairs = [data.Pair(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    encoded, _ = data.encode_pairs(tokenizer, pairs, 256)
    with torch.no_grad():
        chosen, rejected = dpo.pair_logps(model, encoded, data.pad_id(tokenizer), "cpu")
        apart = data.collate([p.chosen for p in encoded] + [p.rejected for p in encoded], data.pad_id(tokenizer))
        per_token = token_logps(
            model(input_ids=apart["input_ids"], attention_mask=apart["attention_mask"]).logits, apart["input_ids"]
        )
        expected = (per_token * apart["mask"][:, 1:]).sum(1)  # logits at t predict token t + 1
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-4)


# ----------------------------------------------------------------------------- SimPO, ORPO, KTO


def count_model_loads(monkeypatch) -> list:
    from transformers import AutoModelForCausalLM

    loaded = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a) or real(*a, **k))
    return loaded


@pytest.mark.parametrize(
    "options", [{"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}, {"loss_type": "orpo", "orpo_lambda": 0.5}]
)
def test_simpo_and_orpo_learn_the_marker_without_a_reference(
    tmp_path: Path, tiny_model: Path, prefs, monkeypatch, options: dict
) -> None:
    """Reference-free: only the policy is loaded, and no reference is ever asked for; the loss falls and the
    held-out chosen answers become the likelier ones (by mean log-prob, or by log-odds for ORPO)."""
    loaded = count_model_loads(monkeypatch)
    monkeypatch.setattr(dpo.runtime, "load_reference", lambda *a, **k: pytest.fail("a reference model was loaded"))
    cfg = make_config(tmp_path, tiny_model, prefs, max_steps=12, lr=1e-3, dpo=options)
    dpo.train(cfg)
    assert len(loaded) == 1  # the policy only

    train, evals = read_metrics(cfg.output_dir), read_metrics(cfg.output_dir, "eval")
    assert "kl_estimate" not in train[1] and all(math.isfinite(train[s]["loss"]) for s in train)
    assert sum(train[s]["loss"] for s in (10, 11, 12)) / 3 < train[1]["loss"] - 0.2
    assert evals[12]["reward_accuracy"] >= 0.9 and evals[12]["reward_margin"] > evals[0]["reward_margin"] + 0.5
    if options["loss_type"] == "orpo":
        # its SFT term: the chosen answers' mean token NLL, which falls
        assert train[12]["nll"] < train[1]["nll"] - 1.0 and train[1]["loss"] > train[1]["nll"]
    else:
        # at the start the margins are near 0, so each loss is near -log sigmoid(-gamma) (convex: at least that
        # at the mean margin)
        assert train[1]["loss"] == pytest.approx(math.log1p(math.exp(0.5 - train[1]["reward_margin"])), abs=0.05)


def test_kto_from_pairs_learns_the_marker(tmp_path: Path, tiny_model: Path, prefs) -> None:
    """Each pair as a desirable and an undesirable answer: at step 1 policy = reference and z0 = 0, so every
    answer's loss is 1 - sigmoid(0) = 1/2; then held-out answers move to their label's side of z0."""
    cfg = make_config(tmp_path, tiny_model, prefs, max_steps=20, lr=1e-3, dpo={"loss_type": "kto", "beta": 0.1})
    dpo.train(cfg)
    train, evals = read_metrics(cfg.output_dir), read_metrics(cfg.output_dir, "eval")
    assert train[1]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert train[1]["kl_reference"] == 0.0 and train[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evals[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert {"kl_reference", "kl_estimate", "reward_accuracy", "grad_norm"} <= set(train[20])
    assert max(train[s]["kl_reference"] for s in train) > 0  # the batch's estimate is used, clamped at 0
    assert sum(train[s]["loss"] for s in range(15, 21)) / 6 < 0.45
    assert evals[20]["reward_accuracy"] >= 0.9 and evals[20]["reward_margin"] > 0.3


def unpaired_rows(records: list[dict], drop_every: int = 3) -> list[dict]:
    """TRL's unpaired preference format from pairs, every `drop_every`-th undesirable answer left out."""
    rows = []
    for i, r in enumerate(records):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        if i % drop_every:
            rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def test_kto_on_unpaired_rows_jsonl_and_hf_folder_with_lora(tmp_path: Path, tiny_model: Path) -> None:
    """Unpaired, unbalanced answers (JSONL to train, a HF datasets folder to evaluate) under LoRA, whose
    reference is the policy with its adapter off."""
    from datasets import Dataset

    train = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows(preference_records(30, seed=0)))
    held_out = tmp_path / "unpaired-eval"
    Dataset.from_list(unpaired_rows(preference_records(9, seed=1))).save_to_disk(str(held_out))
    cfg = make_config(
        tmp_path,
        tiny_model,
        {"train": train, "eval": held_out},
        max_steps=8,
        lr=5e-3,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        dpo={"loss_type": "kto", "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.33},
    )
    dpo.train(cfg)
    train_metrics, evals = read_metrics(cfg.output_dir), read_metrics(cfg.output_dir, "eval")
    assert all(math.isfinite(m["loss"]) for m in train_metrics.values()) and sorted(train_metrics) == list(range(1, 9))
    assert 0.5 <= train_metrics[1]["loss"] <= 0.5 * 1.33 + 1e-6  # at h = 0 each loss is half its weight
    assert evals[8]["reward_margin"] > evals[0]["reward_margin"]


def test_kl_partners_shift_by_one_and_skip_the_same_prompt() -> None:
    from cai.train import data

    assert data.kl_partners(["a", "b", "c", "d"]) == [3, 0, 1, 2]  # TRL's shift: each takes the one before
    # chosen and rejected of one prompt side by side: each takes the nearest earlier other prompt
    assert data.kl_partners(["a", "a", "b", "b"]) == [3, 3, 1, 1]
    assert data.kl_partners(["a", "a"]) == [None, None] and data.kl_partners(["a"]) == [None]


def test_swap_answer_joins_one_prompt_with_another_answer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from cai.train import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first, second = (
        data.Example([{"role": "user", "content": q}], [{"role": "assistant", "content": a}], True, q)
        for q, a in (("Why is the sky blue?", "Light scatters."), ("Hi?", "Hello there, how can I help you today?"))
    )
    (a, b), _ = data.encode_examples(tokenizer, [first, second], 256)
    swapped = data.swap_answer(a, b, 256)
    expected = data.encode(tokenizer, first.prompt + second.completion, train_from=1)
    assert swapped == expected  # the same ids and mask as the conversation tokenized whole
    cut = data.swap_answer(a, b, a.answer_start + 2)
    assert cut.input_ids == expected.input_ids[: a.answer_start + 2] and sum(cut.mask) == 2


def test_load_examples_reads_unpaired_rows_and_unpairs_pairs(tmp_path: Path) -> None:
    from cai.train import data

    pair = preference_records(1)[0]
    row = {"prompt": pair["prompt"], "completion": pair["chosen"], "label": False, "group_id": 7}
    examples = data.load_examples(write_jsonl(tmp_path / "mixed.jsonl", [row, pair]))
    assert [(e.completion, e.label, e.group) for e in examples] == [
        (pair["chosen"], False, "7"),
        (pair["chosen"], True, "p0"),
        (pair["rejected"], False, "p0"),
    ]
    assert len(data.load_examples(tmp_path / "mixed.jsonl", limit=1)) == 1  # limit counts records
    with pytest.raises(InputError, match="only `cai train dpo` with dpo.loss_type kto"):
        data.load_preferences(tmp_path / "mixed.jsonl")


BAD_OPTIONS = [
    ({"dpo": {"simpo_gamma": 0.5}}, "dpo.simpo_gamma", "an option of loss_type simpo, not sigmoid"),
    ({"dpo": {"loss_type": "kto", "orpo_lambda": 0.5}}, "dpo.orpo_lambda", "an option of loss_type orpo, not kto"),
    ({"dpo": {"loss_type": "ipo", "kto_undesirable_weight": 1.3}}, "dpo.kto_undesirable_weight", "loss_type kto"),
    ({"dpo": {"loss_type": "simpo", "precompute_ref": True}}, "dpo.precompute_ref", "simpo is reference-free"),
    ({"dpo": {"loss_type": "orpo", "reference": "./no-such-model"}}, "dpo.reference", "orpo is reference-free"),
    ({"dpo": {"loss_type": "orpo", "beta": 0.2}}, "dpo.beta", "orpo_lambda"),
    ({"dpo": {"loss_type": "kto", "precompute_ref": True}}, "dpo.precompute_ref", "every step"),
    ({"dpo": {"loss_type": "kto", "use_soft_labels": True}}, "dpo.use_soft_labels", "desirable or not"),
    ({"dpo": {"loss_type": "kto"}, "batch_size": 1}, "batch_size", "at least 2"),
    ({"dpo": {"loss_type": "simpo", "simpo_gamma": -1}}, "dpo.simpo_gamma", "-1"),
    ({"dpo": {"loss_type": "kto", "kto_desirable_weight": 0}}, "dpo.kto_desirable_weight", "0"),
]


@pytest.mark.parametrize("edit, field, says", BAD_OPTIONS, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_OPTIONS)])
def test_bad_loss_options_exit_2_naming_the_field(
    edit: dict, field: str, says: str, tmp_path: Path, tiny_model: Path, monkeypatch, capsys
) -> None:
    assert_bad_input(tmp_path, tiny_model, monkeypatch, capsys, edit, [PAIR], f"train.yaml: {field}: ", says)


def test_unpaired_rows_for_a_pairwise_loss_exit_2_in_one_line(tmp_path: Path, tiny_model: Path, monkeypatch, capsys):
    row = {"prompt": PAIR["prompt"], "completion": PAIR["chosen"], "label": True}
    says = "pairs (chosen, rejected) are needed here; only `cai train dpo` with dpo.loss_type kto"
    assert_bad_input(tmp_path, tiny_model, monkeypatch, capsys, {}, [row, row], "data.jsonl:1: completion: ", says)


PAIR = {
    "prompt": [{"role": "user", "content": "Hi?"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


def assert_bad_input(tmp_path, tiny_model, monkeypatch, capsys, edit: dict, rows: list, prefix: str, says: str):
    """`cai train dpo` ends with exit 2 and one stderr line `FILE: field: what is wrong`, writing nothing."""
    import yaml

    from cai.cli import EXIT_BAD_INPUT, main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", rows * 2)
    doc = {"model": str(tiny_model), "data": {"train": "data.jsonl"}, "output_dir": "out", "max_steps": 1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**doc, "batch_size": 2, **edit}))
    assert main(["train", "dpo", "train.yaml"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and says in lines[0], captured.err
    assert not (tmp_path / "out").exists()
