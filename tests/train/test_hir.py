"""HIR on the tiny model with the rule reward: answers are relabeled with the band their reward reached,
training on them makes the best band's instruction draw better answers than the starting policy gave,
and a run killed mid-training resumes from its checkpoint without sampling again. Relabeling by hand,
and bad configs ending with exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from synthetic import PROMPTS, write_config

from cai.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from cai.train import config as train_config
from cai.train import hir
from cai.train.config import Band

ROOT = Path(__file__).resolve().parents[2]
BANDS = (Band("poor"), Band("fair", 0.3), Band("excellent", 0.6))


def test_band_of_takes_the_highest_band_reached() -> None:
    assert [hir.band_of(r, BANDS) for r in (-5.0, 0.0, 0.29, 0.3, 0.59, 0.6, 7.0)] == [
        "poor",
        "poor",
        "poor",
        "fair",
        "fair",
        "excellent",
        "excellent",
    ]


def test_relabel_rewrites_the_last_user_message_only() -> None:
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why {x}?"})
    relabeled = hir.relabel(messages, "{prompt}\n\n(Write an answer that is {band}.)", "excellent")
    assert relabeled == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why {x}?\n\n(Write an answer that is excellent.)"},
    ]
    assert messages[1]["content"] == "Why {x}?"  # a prompt's braces are text, and the prompt is not changed
    assert hir.relabel(messages, "[{band}] {{raw}} {prompt}", "poor")[-1]["content"] == "[poor] {raw} Why {x}?"


def hir_config(tmp_path: Path, tiny_model: Path, tokens: list[str], **options) -> Path:
    return write_config(
        tmp_path / "hir.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / "out"),
        max_steps=72,
        batch_size=16,
        lr=3e-3,
        max_length=192,
        save_every=24,
        seed=2,
        hir={
            "rewards": [{"name": "share", "rule": "token_fraction", "tokens": tokens}],
            "bands": [{"label": "poor"}, {"label": "excellent", "at_least": 0.3}],
            "samples": 6,
            "max_new_tokens": 3,
            "vllm_options": {"kv_cache_memory_bytes": 256 << 20},
            **options,
        },
    )


def test_hir_improves_the_best_band_and_resumes_after_a_kill(tmp_path, tiny_model, target_tokens, monkeypatch):
    config = hir_config(tmp_path, tiny_model, target_tokens)
    out = tmp_path / "out"
    template = train_config.HIROptions.template

    # killed after step 24's checkpoint of the iteration's training
    real = hir.fine_tune

    def killed(*args):
        real(*args, stop_after=24)
        raise KeyboardInterrupt

    monkeypatch.setattr(hir, "fine_tune", killed)
    assert main(["train", "hir", str(config)]) == EXIT_INTERRUPTED
    monkeypatch.undo()
    training = out / "iteration-1" / "train"
    assert [p.name for p in (training / "checkpoints").iterdir()] == ["step-24"] and not (out / "final").exists()
    sampled_at = (out / "iteration-1" / "relabeled.jsonl").stat().st_mtime_ns
    before = (training / "metrics.jsonl").read_text().splitlines()

    assert main(["train", "hir", str(config)]) == 0
    assert (out / "iteration-1" / "relabeled.jsonl").stat().st_mtime_ns == sampled_at  # not sampled again
    after = (training / "metrics.jsonl").read_text().splitlines()
    assert after[:24] == before and [json.loads(line)["step"] for line in after] == list(
        range(1, 73)
    )  # steps 25-72 only were trained again
    metrics = [json.loads(line) for line in after]
    assert all(m["with_negatives"] > 0 and m["contrastive"] > 0 for m in metrics)
    first, last = (sum(m["contrastive"] for m in part) / 8 for part in (metrics[:8], metrics[-8:]))
    assert last < first / 2  # each answer comes to be likelier under its own band's instruction than the other's

    # relabeled: each answer's instruction names the band its reward reached
    records = [json.loads(line) for line in (out / "iteration-1" / "relabeled.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 48 and {r["band"] for r in records} == {"poor", "excellent"}
    for r in records:
        assert r["band"] == ("excellent" if r["reward"] >= 0.3 else "poor")
        assert r["messages"][-2]["content"] == template.format(prompt=r["prompt"][-1]["content"], band=r["band"])

    # the trained model asked with the best band's instruction answers better than the starting policy did
    log = [json.loads(line) for line in (out / "hir.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in log] == ["iteration-1", "evaluation"] and log[0]["model"] == str(tiny_model)
    assert log[1]["model"] == str(training / "final")
    assert log[1]["mean_reward"] > log[0]["mean_reward"] + 0.05, log
    assert log[1]["bands"]["excellent"] > log[0]["bands"]["excellent"]
    instruction = json.loads((out / "final" / "hir.json").read_text())
    assert instruction["band"] == "excellent" and instruction["instruction"] == template.format(
        prompt="{prompt}", band="excellent"
    )
    assert (out / "final" / "model.safetensors").exists()


def test_the_example_validates_with_the_judge_as_its_reward() -> None:
    """train/hir_demo.yaml (the README's example) on the embedded model, scored by the judge: the judge
    is a reward source of HIR, unlike the other offline trainers."""
    cfg = train_config.load("hir", ROOT / "train" / "hir_demo.yaml")
    assert cfg.model == "smollm2" and cfg.lr == 1e-5 and cfg.hir.rewards[0].judge is not None
    assert [b.label for b in cfg.hir.bands] == [
        "harmful",
        "borderline",
        "harmless",
    ] and cfg.hir.template == train_config.HIROptions.template
    assert {(where, path.resolve()) for where, path in cfg.read_paths()} == {
        ("data.train", ROOT / "prompts" / "red_team_demo.jsonl"),
        ("hir.rewards[0].judge.constitution", ROOT / "constitutions" / "harmless.yaml"),
    }  # what the service confines to its workspace


RULE = {"name": "share", "rule": "token_fraction", "tokens": ["a"]}
TWO_BANDS = [{"label": "low"}, {"label": "high", "at_least": 0.5}]


@pytest.mark.parametrize(
    "section, field, says",
    [
        ({"rewards": [RULE]}, "hir", "'bands' is required"),
        ({"rewards": [RULE], "bands": TWO_BANDS[:1]}, "hir.bands", "too short"),
        ({"rewards": [RULE], "bands": TWO_BANDS, "template": "{prompt} please"}, "hir.template", "{prompt} and {band}"),
        (
            {"rewards": [RULE], "bands": TWO_BANDS, "template": "{prompt} {band} {score}"},
            "hir.template",
            "no other (has: band, prompt, score)",
        ),
        ({"rewards": [RULE], "bands": TWO_BANDS, "template": "{prompt} {band"}, "hir.template", "literal brace"),
        (
            {"rewards": [RULE], "bands": [{"label": "low", "at_least": 0}, TWO_BANDS[1]]},
            "hir.bands[0].at_least",
            "the lowest",
        ),
        ({"rewards": [RULE], "bands": [*TWO_BANDS, {"label": "top"}]}, "hir.bands[2].at_least", "lower bound"),
        (
            {"rewards": [RULE], "bands": [*TWO_BANDS, {"label": "top", "at_least": 0.5}]},
            "hir.bands[2].at_least",
            "must rise",
        ),
        (
            {"rewards": [RULE], "bands": [*TWO_BANDS, {"label": "low", "at_least": 0.9}]},
            "hir.bands[2].label",
            "a second band",
        ),
        ({"rewards": [RULE], "bands": TWO_BANDS, "contrastive_coef": -1}, "hir.contrastive_coef", "minimum"),
    ],
)
def test_bad_hir_config_exits_2_naming_the_field(
    section, field, says, tmp_path, tiny_model, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi?"}\n')
    (tmp_path / "train.yaml").write_text(
        yaml.safe_dump({"model": str(tiny_model), "data": {"train": "p.jsonl"}, "output_dir": "out", "hir": section})
    )
    assert main(["train", "hir", "train.yaml"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train.yaml: {field}: ") and says in err[0], err
    assert not (tmp_path / "out").exists()
