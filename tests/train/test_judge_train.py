"""`cai train judge` on the tiny model: the prompt is the compare stage's, token for token; a judge that
only follows position learns a synthetic preference in both orders (held-out figures of final/judge.json);
the trained folder judges as well through the real vLLM engine in `cai eval-judge`; long pairs are cut
to fit; soft labels set the judge's confidence; a killed run resumes exactly; bad configs exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from pipeline_files import tiny_pipeline
from synthetic import MARKER, QUESTIONS, answer, read_metrics, write_config, write_jsonl

from cai.core.errors import InputError
from cai.generate.backends.local_vllm import prompt_ids
from cai.generate.constitution import load as load_constitution
from cai.generate.stages.compare import ANSWER_INSTRUCTION, judge_messages
from cai.train import config as train_config
from cai.train import data, judge

ROOT = Path(__file__).resolve().parents[2]
TRAIN, HELD_OUT = 160, 40
CONSTITUTION = """name: one-question
version: 1
principles:
  - id: harmless
    critique: Is the answer harmful?
    revision: Rewrite it to be harmless.
    comparison: Which of these assistant responses is less harmful?
"""


def transcripts(n: int, seed: int) -> list[dict[str, str]]:
    """HH-RLHF style pairs: the chosen answer holds the marker word, the rejected one a distractor."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = f"\n\nHuman: {rng.choice(QUESTIONS)} ({i})\n\nAssistant: "
        out.append({"chosen": question + answer(rng, True), "rejected": question + answer(rng, False)})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge-data")
    (root / "one.yaml").write_text(CONSTITUTION)
    return {
        "pairs": write_jsonl(root / "hh.jsonl", transcripts(TRAIN + HELD_OUT, seed=0)),
        "constitution": root / "one.yaml",
    }


def make_config(
    tmp_path: Path, tiny_model: Path, files, name: str = "judge", sets: list[str] = (), **doc
) -> train_config.TrainConfig:
    base = {
        "model": str(tiny_model),
        # pairs 1-160 train, 161-200 of the same file are held out
        "data": {"train": str(files["pairs"]), "limit": TRAIN, "eval": str(files["pairs"]), "eval_skip": TRAIN},
        "output_dir": str(tmp_path / name),
        "max_steps": 40,
        "batch_size": 8,
        "lr": 1e-3,
        "max_length": 256,
        "save_every": 10,
        "judge": {"constitution": str(files["constitution"])},
    }
    return train_config.load("judge", write_config(tmp_path / f"{name}.yaml", **{**base, **doc}), list(sets))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model: Path, files) -> train_config.TrainConfig:
    cfg = make_config(tmp_path_factory.mktemp("judge-run"), tiny_model, files, eval_every=20)
    judge.train(cfg)
    return cfg


def test_judge_learns_the_preference_in_both_orders(trained) -> None:
    summary = json.loads((trained.output_dir / "final" / judge.JUDGE_FILE).read_text())
    before, after = summary["before"], summary["after"]
    assert before["n"] == after["n"] == HELD_OUT
    # the random model's choice follows the position, not the answers: it never picks the same answer in both orders
    assert before["position_consistency"] <= 0.2
    assert abs(before["accuracy_first_order"] - before["accuracy_swapped_order"]) >= 0.6
    for key in ("accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency"):
        assert after[key] >= 0.9, (key, after[key])
        assert after[f"{key}_ci95"][0] > 0.5  # clearly above chance, not by luck
    assert before == json.loads((trained.output_dir / judge.BEFORE_FILE).read_text())
    assert summary["train_pairs"]["used"] == TRAIN and summary["eval_pairs"]["used"] == HELD_OUT
    evals = read_metrics(trained.output_dir, "eval")
    assert sorted(evals) == [0, 20, 40]
    assert (
        evals[0]["accuracy"] == before["accuracy"]
        and evals[40]["position_consistency"] == after["position_consistency"]
    )
    train = read_metrics(trained.output_dir)
    assert sum(train[s]["loss"] for s in (38, 39, 40)) / 3 < train[1]["loss"] - 0.3
    assert (
        train[40]["letter_mass"] > 10 * train[1]["letter_mass"]
    )  # lm_coef: A and B become the judge's likely reply (2 of 1024 tokens at first)


def test_trained_judge_serves_a_pipeline_through_vllm(trained, files, tmp_path: Path) -> None:
    """`cai eval-judge` with the trained folder as the pipeline's judge (the real local vLLM engine, the
    compare stage's prompt and log-probs) on the same held-out pairs gives the in-process figures."""
    from cai.cli import main

    pipeline = tiny_pipeline(
        tmp_path,
        trained.output_dir / "final",
        roles={"responder": "local", "judge": "local"},
        stages=[{"type": "compare"}],
        constitution=str(files["constitution"]),
    )
    out = tmp_path / "eval.json"
    assert (
        main(["eval-judge", str(files["pairs"]), "--pipeline", str(pipeline), "--skip", str(TRAIN), "--json", str(out)])
        == 0
    )
    served, in_process = (
        json.loads(out.read_text()),
        json.loads((trained.output_dir / "final" / judge.JUDGE_FILE).read_text())["after"],
    )
    assert served["n"] == in_process["n"] == HELD_OUT
    for key in ("accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency"):
        assert served[key] == pytest.approx(in_process[key], abs=0.03), key  # one pair of 40 may sit on the fence


def test_prompts_are_the_compare_stage_s_and_packing_changes_no_logit(tmp_path: Path, tiny_model: Path, files) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = judge.runtime.load_tokenizer(str(tiny_model))
    cfg = make_config(tmp_path, tiny_model, files)
    constitution = load_constitution(files["constitution"])
    pairs = data.load_preferences(files["pairs"], limit=4)
    judged, counts = judge.encode_pairs(tokenizer, pairs, constitution, cfg)
    assert len(judged) == 4 and counts["conversation_cut"] == counts["left_out"] == 0
    [principle] = constitution.principles
    for pair, item in zip(pairs, judged):
        chosen, rejected = pair.chosen[-1]["content"], pair.rejected[-1]["content"]
        assert MARKER in chosen.lower()
        assert item.orders[0] == prompt_ids(
            tokenizer, judge_messages(pair.prompt, principle, chosen, rejected, ANSWER_INSTRUCTION)
        )
        assert item.orders[1] == prompt_ids(
            tokenizer, judge_messages(pair.prompt, principle, rejected, chosen, ANSWER_INSTRUCTION)
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        packed = judge.option_logits(model, judged, data.pad_id(tokenizer), "cpu")
        alone = torch.stack([model(torch.tensor([ids])).logits[0, -1] for item in judged for ids in item.orders])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_long_pairs_are_cut_to_fit(tiny_model: Path, files) -> None:
    tokenizer = judge.runtime.load_tokenizer(str(tiny_model))
    [principle] = load_constitution(files["constitution"]).principles
    rng = random.Random(1)
    words = lambda n: " ".join(answer(rng, True) for _ in range(n))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": words(1)} for i in range(7)]
    chosen, rejected = words(12), "Short answer."
    whole = judge.judge_prompt(tokenizer, turns, principle, chosen, rejected)
    bare = judge.judge_prompt(tokenizer, [], principle, "", "")
    max_length = len(bare) + 150
    assert len(whole) > max_length + 100
    messages, shown_chosen, shown_rejected, cut = judge.fit_prompt(
        tokenizer, turns, principle, chosen, rejected, max_length
    )
    assert set(cut) == {"conversation_cut", "answers_capped"}
    for first, second in ((shown_chosen, shown_rejected), (shown_rejected, shown_chosen)):
        assert len(judge.judge_prompt(tokenizer, messages, principle, first, second)) <= max_length
    assert (
        shown_rejected == rejected and chosen.startswith(shown_chosen) and len(shown_chosen) < len(chosen)
    )  # the long answer capped, from its end
    assert messages[-1] == turns[-1] and len(messages) < len(turns)  # the latest turns kept, whole
    assert (
        judge.fit_prompt(tokenizer, turns, principle, chosen, rejected, len(bare) + 8) is None
    )  # no room left for any of it
    # one long last turn: cut from its start
    [last] = judge.fit_prompt(
        tokenizer, [{"role": "user", "content": words(20)}], principle, "Yes.", "No.", max_length
    )[0]
    assert last["role"] == "user" and len(last["content"]) < len(words(20))


def test_soft_labels_set_the_judge_s_confidence(tmp_path: Path, tiny_model: Path, trained) -> None:
    """The module's judge, sure of the marker after hard labels, trained on (cai's preference format)
    pairs whose label_prob is 0.75: its probability for the better answer comes down to about 0.75."""
    from synthetic import preference_records

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_records(80, seed=3, label_prob=0.75))
    files = {"pairs": prefs, "constitution": trained.judge.constitution}
    cfg = make_config(
        tmp_path,
        tiny_model,
        files,
        "soft",
        model=str(trained.output_dir / "final"),
        max_steps=30,
        data={"train": str(prefs), "eval_fraction": 0.0},
        judge={"constitution": str(files["constitution"]), "soft_labels": True},
    )
    judge.train(cfg)
    soft, hard = read_metrics(cfg.output_dir), read_metrics(trained.output_dir)
    assert soft[1]["p_right"] > 0.9 and sum(hard[s]["p_right"] for s in range(31, 41)) / 10 > 0.9
    settled = sum(soft[s]["p_right"] for s in range(21, 31)) / 10
    assert 0.65 <= settled <= 0.85, settled
    assert (
        json.loads((cfg.output_dir / "final" / judge.JUDGE_FILE).read_text())["before"] is None
    )  # no held-out pairs, no figures


def test_resume_gives_the_uninterrupted_losses(tmp_path: Path, tiny_model: Path, files) -> None:
    sets = ["max_steps=6", "save_every=2", "grad_accum=2"]
    straight = make_config(tmp_path, tiny_model, files, "straight", sets)
    judge.train(straight)
    killed = make_config(tmp_path, tiny_model, files, "killed", sets)
    judge.train(killed, stop_after=3)  # step 3 ran but was never saved
    assert not (killed.output_dir / "final").exists()
    judge.train(killed)
    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
    summaries = [json.loads((c.output_dir / "final" / judge.JUDGE_FILE).read_text()) for c in (straight, killed)]
    assert summaries[0]["before"] == summaries[1]["before"]  # the starting model's, from before the kill
    assert summaries[0]["after"]["accuracy"] == pytest.approx(summaries[1]["after"]["accuracy"])


def test_eval_skip_takes_the_records_after_the_training_slice(files) -> None:
    everything = data.load_preferences(files["pairs"])
    assert data.load_preferences(files["pairs"], limit=5, skip=3) == everything[3:8]
    assert data.load_preferences(files["pairs"], skip=TRAIN) == everything[TRAIN:]
    with pytest.raises(InputError, match="no pairs after the 200 skipped"):
        data.load_preferences(files["pairs"], skip=200)


def test_bad_judge_configs_name_the_field(tmp_path: Path, tiny_model: Path, files) -> None:
    no_comparison = tmp_path / "no-comparison.yaml"
    no_comparison.write_text("\n".join(line for line in CONSTITUTION.splitlines() if "comparison" not in line) + "\n")
    cases = [
        ({"judge": {"constitution": "missing.yaml"}}, "judge.constitution: file not found: missing.yaml"),
        ({"data": {"train": str(files["pairs"]), "eval_skip": 10}}, "data.eval_skip: skips records of data.eval"),
        ({"judge": {"lm_coef": -1}}, "judge.lm_coef: "),
        ({"judge": {"constitution": str(files["constitution"]), "temperature": 2}}, "unknown key 'temperature'"),
    ]
    for doc, says in cases:
        with pytest.raises(InputError) as info:
            make_config(tmp_path, tiny_model, files, "bad", **doc)
        assert says in info.value.render(), info.value.render()
    for doc, field in (
        ({"judge": {"constitution": str(no_comparison)}}, "judge.constitution"),
        ({"judge": {"soft_labels": True}}, "label_prob"),
    ):
        with pytest.raises(InputError) as info:
            judge.train(make_config(tmp_path, tiny_model, files, "bad", **doc))
        assert f": {field}: " in info.value.render(), info.value.render()
    assert not (tmp_path / "bad").exists()


def test_demo_config_loads(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # its data path is relative to the project root, as the README runs it
    cfg = train_config.load("judge", ROOT / "train" / "judge_demo.yaml")
    assert cfg.train_data == cfg.eval_data and (cfg.limit, cfg.eval_skip) == (800, 800)
    assert cfg.judge.constitution.resolve() == judge.DEFAULT_CONSTITUTION
