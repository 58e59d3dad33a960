"""Malformed train configs and training data: `cai train` / `cai eval-rm` end with exit 2 and one
stderr line `FILE: field.path: what is wrong` (`FILE:LINE: ...` for a data file), nothing written."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from cai.cli import EXIT_BAD_INPUT, main

PAIR = {
    "prompt": [{"role": "user", "content": "Hi?"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
    "label_prob": 0.9,
}
RULE = {"name": "share", "rule": "token_fraction", "tokens": ["a"]}
SFT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@dataclass
class Case:
    kind: str  # a trainer kind or eval-rm
    config: Any = None  # an edit of the base config, or raw text
    data: list | None = None  # the training data's lines (dicts dumped, strings verbatim)
    sets: tuple[str, ...] = ()
    file: str = "train.yaml"  # the file the error must name: train.yaml, data.jsonl or model
    where: str = ": "
    says: str = ""


def put(path: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *head, last = path.split(".")
        for part in head:
            doc = doc.setdefault(part, {})
        doc[last] = value

    return edit


def drop(key: str) -> Callable[[dict], None]:
    return lambda doc: doc.pop(key)


CASES = [
    pytest.param(Case("dpo", config=""), id="config-empty"),
    pytest.param(Case("dpo", config="model: [unclosed\n", says="YAML syntax error"), id="config-yaml-syntax"),
    pytest.param(
        Case("sft", config="- model: x\n", where=": <root>: ", says="expected mapping, got list"), id="config-top-list"
    ),
    pytest.param(Case("dpo", config=drop("model"), where=": <root>: ", says="'model' is required"), id="model-missing"),
    pytest.param(Case("dpo", config=put("bogus", 1), where=": <root>: ", says="unknown key 'bogus'"), id="unknown-key"),
    pytest.param(Case("dpo", config=put("lr", 0), where=": lr: ", says="greater than 0"), id="lr-zero"),
    pytest.param(
        Case("rm", config=put("batch_size", 2.0), where=": batch_size: ", says="got number"), id="batch-size-float"
    ),
    pytest.param(
        Case(
            "dpo",
            config=put("dpo.loss_type", "robust"),
            where=": dpo.loss_type: ",
            says="must be one of sigmoid, ipo, hinge, cpl",
        ),
        id="dpo-loss-type",
    ),
    pytest.param(
        Case("dpo", config=put("dpo.beta", -1), where=": dpo.beta: ", says="greater than 0"), id="dpo-beta-negative"
    ),
    pytest.param(
        Case(
            "dpo",
            config=put("dpo", {"loss_type": "cpl", "precompute_ref": True}),
            where=": dpo.precompute_ref: ",
            says="reference-free",
        ),
        id="cpl-reference",
    ),
    pytest.param(
        Case("dpo", config=put("dpo.cpl_lambda", 0.5), where=": dpo.cpl_lambda: ", says="an option of loss_type cpl"),
        id="cpl-lambda-without-cpl",
    ),
    pytest.param(
        Case(
            "dpo",
            config=put("dpo", {"loss_type": "cpl", "cpl_lambda": 1.5}),
            where=": dpo.cpl_lambda: ",
            says="greater than the maximum of 1",
        ),
        id="cpl-lambda-range",
    ),
    pytest.param(
        Case("sft", config=put("dpo.beta", 0.1), data=[SFT], where=": dpo: ", says="`cai train dpo`"),
        id="section-of-another-trainer",
    ),
    pytest.param(
        Case(
            "rest",
            config=put("rest", {"rewards": [RULE], "thresholds": [0.5, 0.5]}),
            where=": rest.thresholds: ",
            says="must rise",
        ),
        id="rest-thresholds-not-rising",
    ),
    pytest.param(
        Case(
            "rest",
            config=put("rest", {"rewards": [RULE], "thresholds": [0.5, 1.5], "threshold_type": "quantile"}),
            where=": rest.thresholds: ",
            says="[0, 1)",
        ),
        id="rest-quantile-above-one",
    ),
    pytest.param(
        Case("rest", config=put("rest.samples", 4), where=": rest: ", says="'rewards' is required"),
        id="rest-without-rewards",
    ),
    pytest.param(
        Case(
            "rm",
            config=put("rm", {"use_margin": True, "use_soft_labels": True}),
            where=": rm.use_soft_labels: ",
            says="enable one",
        ),
        id="rm-margin-and-soft-labels",
    ),
    pytest.param(
        Case("rm", config=put("rm.center_coef", "big"), where=": rm.center_coef: ", says="got string"),
        id="rm-center-string",
    ),
    pytest.param(
        Case(
            "rm",
            config=put("rm.pretrain", {"data": "generic.jsonl"}),
            where=": rm.pretrain.data: ",
            says="not found: generic.jsonl",
        ),
        id="rm-pretrain-data-missing",
    ),
    pytest.param(
        Case("rm", config=put("rm.pretrain", {"epochs": 1}), where=": rm.pretrain: ", says="'data' is required"),
        id="rm-pretrain-without-data",
    ),
    pytest.param(
        Case("dpo", config=put("data.train", "missing.jsonl"), where=": data.train: ", says="not found: missing.jsonl"),
        id="data-missing",
    ),
    pytest.param(
        Case("dpo", config=put("model", "./no-model"), where=": model: ", says="model folder not found"),
        id="model-folder-missing",
    ),
    pytest.param(Case("dpo", config=put("lora.r", 0), where=": lora.r: ", says="0"), id="lora-r-zero"),
    pytest.param(
        Case("dpo", config=put("scheduler", "exp"), where=": scheduler: ", says="cosine"), id="scheduler-unknown"
    ),
    pytest.param(
        Case("dpo", config=put("data.eval_fraction", 1), where=": data.eval_fraction: ", says=""),
        id="eval-fraction-one",
    ),
    pytest.param(Case("dpo", sets=("lr=abc",), where=": lr: ", says="got string"), id="set-wrong-type"),
    pytest.param(Case("dpo", sets=("lr",), says="key.path=value"), id="set-without-equals"),
    pytest.param(
        Case("dpo", sets=("max_steps.x=1",), where=": max_steps.x: ", says="no such place"), id="set-through-a-scalar"
    ),
    pytest.param(Case("distill", where=": distill: ", says="needs a distill section"), id="distill-without-section"),
    pytest.param(
        Case("distill", config=put("distill.context", {}), where=": distill.context: ", says="exactly one of"),
        id="distill-no-context",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill.context", {"system": "Be kind.", "system_file": "data.jsonl"}),
            where=": distill.context: ",
            says="exactly one of",
        ),
        id="distill-two-contexts",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill.context", {"prompt": "Be kind."}),
            where=": distill.context: ",
            says="'prompt'",
        ),
        id="distill-context-unknown",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill.context", {"constitution": "none.yaml"}),
            where=": distill.context.constitution: ",
            says="not found: none.yaml",
        ),
        id="distill-constitution-missing",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill", {"context": {"system": "Be kind."}, "target": "probs"}),
            where=": distill.target: ",
            says="logits, text",
        ),
        id="distill-target",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill", {"context": {"system": "Be kind."}, "target": "text", "kl": "reverse"}),
            where=": distill.kl: ",
            says="an option of target logits",
        ),
        id="distill-kl-with-text",
    ),
    pytest.param(
        Case(
            "distill",
            config=put("distill", {"context": {"system": "Be kind."}, "teacher": "./no-teacher"}),
            where=": distill.teacher: ",
            says="model folder not found",
        ),
        id="distill-teacher-missing",
    ),
    pytest.param(
        Case(
            "judge",
            config=put("judge.constitution", "none.yaml"),
            where=": judge.constitution: ",
            says="not found: none.yaml",
        ),
        id="judge-constitution-missing",
    ),
    pytest.param(
        Case("judge", config=put("judge.lm_coef", -0.1), where=": judge.lm_coef: ", says="minimum"),
        id="judge-lm-coef-negative",
    ),
    pytest.param(
        Case("judge", config=put("data.eval_skip", 10), where=": data.eval_skip: ", says="give data.eval"),
        id="eval-skip-without-eval",
    ),
    pytest.param(
        Case(
            "judge",
            config=put("judge.soft_labels", True),
            data=[{k: v for k, v in PAIR.items() if k != "label_prob"}] * 3,
            file="data.jsonl",
            where=": label_prob: ",
            says="judge.soft_labels",
        ),
        id="judge-soft-labels-without-label-prob",
    ),
    # --- the training data
    pytest.param(
        Case("dpo", data=[PAIR, '{"prompt": oops'], file="data.jsonl", where=":2: ", says="invalid JSON"),
        id="data-invalid-json",
    ),
    pytest.param(
        Case(
            "dpo",
            data=[{k: v for k, v in PAIR.items() if k != "rejected"}],
            file="data.jsonl",
            where=":1: <root>: ",
            says="'rejected' is required",
        ),
        id="data-no-rejected",
    ),
    pytest.param(
        Case("rm", data=[PAIR, {**PAIR, "label_prob": 2}], file="data.jsonl", where=":2: label_prob: ", says="2"),
        id="data-label-prob-above-one",
    ),
    pytest.param(
        Case(
            "dpo",
            data=[{**PAIR, "chosen": [{"role": "user", "content": "x"}]}],
            file="data.jsonl",
            where=":1: chosen: ",
            says="assistant",
        ),
        id="data-chosen-not-assistant",
    ),
    pytest.param(
        Case(
            "dpo",
            data=[{**PAIR, "prompt": [{"role": "robot", "content": "x"}]}],
            file="data.jsonl",
            where=":1: prompt[0].role: ",
            says="'robot'",
        ),
        id="data-bad-role",
    ),
    pytest.param(
        Case(
            "dpo",
            config=put("dpo.use_soft_labels", True),
            data=[{k: v for k, v in PAIR.items() if k != "label_prob"}] * 3,
            file="data.jsonl",
            where=": label_prob: ",
            says="use_soft_labels",
        ),
        id="data-soft-labels-without-label-prob",
    ),
    pytest.param(
        Case(
            "rm",
            config=put("rm.use_margin", True),
            data=[PAIR] * 3,
            file="data.jsonl",
            where=": margin: ",
            says="rm.use_margin needs a margin on every pair",
        ),
        id="data-margin-without-margin",
    ),
    pytest.param(
        Case(
            "sft",
            data=[{"messages": [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Again?"}]}],
            file="data.jsonl",
            where=":1: messages: ",
            says="no assistant message",
        ),
        id="sft-no-assistant",
    ),
    pytest.param(
        Case("sft", data=[{"text": "Hi."}], file="data.jsonl", where=":1: <root>: ", says="'messages' is required"),
        id="sft-not-messages",
    ),
    pytest.param(Case("sft", data=[], file="data.jsonl", says="no records"), id="sft-empty-data"),
    pytest.param(
        Case(
            "dpo",
            data=[{"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "no turns"}],
            file="data.jsonl",
            where=":1: rejected: ",
            says="Assistant turn",
        ),
        id="hh-bad-transcript",
    ),
    # --- eval-rm
    pytest.param(Case("eval-rm", file="model", says="not a reward model"), id="eval-rm-causal-lm"),
    pytest.param(
        Case("eval-rm", data=['{"chosen": 1}'], file="data.jsonl", where=":1: chosen: ", says="expected list"),
        id="eval-rm-bad-pairs",
    ),
]


def base_config(root: Path, tiny_model: Path) -> dict:
    return {
        "model": str(tiny_model),
        "data": {"train": "data.jsonl"},
        "output_dir": str(root / "out"),
        "max_steps": 1,
        "batch_size": 2,
    }


def render_data(lines: list, kind: str) -> str:
    lines = lines if lines is not None else ([SFT] * 4 if kind == "sft" else [PAIR] * 4)
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_train_input(
    case: Case, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data.jsonl").write_text(render_data(case.data, case.kind))
    if case.kind == "eval-rm":
        # the model folder's config says what it is: the tiny causal LM's as it is, or relabelled a reward model
        model_config = json.loads((tiny_model / "config.json").read_text())
        if case.file != "model":
            model_config["architectures"] = ["LlamaForSequenceClassification"]
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text(json.dumps(model_config))
        argv = ["eval-rm", "model", "data.jsonl"]
        expected_file = case.file
    else:
        config = case.config
        if not isinstance(config, str):
            doc = copy.deepcopy(base_config(tmp_path, tiny_model))
            if config is not None:
                config(doc)
            config = yaml.safe_dump(doc)
        (tmp_path / "train.yaml").write_text(config)
        argv = ["train", case.kind, "train.yaml", *[x for s in case.sets for x in ("--set", s)]]
        expected_file = case.file
    before = snapshot(tmp_path)

    code = main(argv)

    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, f"exit {code}, stderr: {captured.err}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    prefix = f"{expected_file}{case.where}"
    assert lines[0].startswith(prefix), f"expected {prefix!r} at the start of {lines[0]!r}"
    assert lines[0][len(prefix) :].strip() and case.says in lines[0], lines[0]
    assert captured.out == ""
    assert snapshot(tmp_path) == before, "bad input must not write or change any file"
    assert not (tmp_path / "out").exists()


def test_the_judge_is_refused_by_offline_trainers_and_pairwise_needs_references(tmp_path: Path) -> None:
    from synthetic import write_config, write_jsonl

    from cai.core.errors import InputError
    from cai.train import config as train_config

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}])
    judge = {
        "backend": {"type": "vllm", "model": "smollm2"},
        "constitution": str(Path(__file__).resolve().parents[2] / "constitutions" / "harmless.yaml"),
    }
    for kind, extra, field in (
        ("rejection", {}, "rejection.rewards[0].judge"),
        ("grpo", {"mode": "pairwise"}, "grpo.rewards[0].judge.references"),
    ):
        path = write_config(
            tmp_path / f"{kind}.yaml",
            model="smollm2",
            data={"train": str(prompts)},
            output_dir="x",
            **{kind: {"rewards": [{"name": "j", "judge": {**judge, **extra}}]}},
        )
        with pytest.raises(InputError) as info:
            train_config.load(kind, path)
        assert info.value.render().startswith(f"{path}: {field}: "), info.value.render()
