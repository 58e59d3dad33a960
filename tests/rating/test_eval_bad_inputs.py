"""Malformed eval files: `cai eval EVAL.yaml` ends with exit 2 and one stderr line `FILE: field.path: what
is wrong` (`FILE:LINE: ...` for a prompt file), nothing written and no engine started: the run directory
is not created. Each case edits one valid base document (or its files) inside tmp_path."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from cai.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cai.rating import config as eval_config

ROOT = Path(__file__).resolve().parents[2]
RED_TEAM = str(ROOT / "prompts" / "red_team_demo.jsonl")
HELPFUL = str(ROOT / "prompts" / "helpful_demo.jsonl")
HARMLESS = str(ROOT / "constitutions" / "harmless.yaml")
EVAL = "eval.yaml"

# A constitution whose principles ask no comparison question: an axis must bring its own.
NO_COMPARISON = {
    "name": "tiny",
    "version": 1,
    "principles": [{"id": "harm", "critique": "Say what is harmful.", "revision": "Rewrite it harmlessly."}],
}

Edit = Callable[[dict], None]


def base_eval(tiny_model: Path) -> dict:
    return {
        "name": "bad-inputs",
        "constitution": HARMLESS,
        "backends": {
            "local": {"type": "vllm", "model": "smollm2"},
            "api": {"type": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1"},
        },
        "models": {"base": {"backend": "local"}, "tuned": {"backend": "local", "model": str(tiny_model)}},
        "baseline": "base",
        "judge": {"backend": "local"},
        "axes": {
            "harmless": {"prompts": RED_TEAM},
            "helpful": {"prompts": HELPFUL, "question": "Which response is more helpful?"},
        },
    }


def put(path: str, value: Any) -> Edit:
    def edit(doc: dict) -> None:
        *head, last = path.split(".")
        for part in head:
            doc = doc[part]
        doc[last] = value

    return edit


def drop(path: str) -> Edit:
    def edit(doc: dict) -> None:
        *head, last = path.split(".")
        for part in head:
            doc = doc[part]
        del doc[last]

    return edit


def both(*edits: Edit) -> Edit:
    def edit(doc: dict) -> None:
        for e in edits:
            e(doc)

    return edit


@dataclass
class Case:
    edit: Edit | str | None = None  # an edit of the base document, or the eval file's raw text
    sets: tuple[str, ...] = ()
    files: dict[str, str] | None = None  # more files written into tmp_path (name -> text)
    folders: tuple[str, ...] = ()  # folders made in tmp_path; `NAME+` gets a copy of the tiny model's config.json
    file: str = EVAL  # the file the error names: the eval file, or one it names
    where: str = ": "  # what follows the file name: `: field.path: `, `:2: `
    says: str = ""


CASES = [
    # --- the file itself
    pytest.param(Case("name: [unclosed\n", says="YAML syntax error at line"), id="yaml-syntax"),
    pytest.param(Case("- name: x\n", where=": <root>: ", says="expected mapping, got list"), id="top-level-list"),
    pytest.param(Case(put("bogus", 1), where=": <root>: ", says="unknown key 'bogus'"), id="unknown-key"),
    pytest.param(Case(drop("baseline"), where=": <root>: ", says="'baseline' is required"), id="baseline-missing"),
    pytest.param(
        Case(sets=("judge.backend.x=1",), where=": judge.backend.x: ", says="no such place"), id="set-through-a-scalar"
    ),
    pytest.param(Case(sets=("judge.nope=1",), where=": judge: ", says="'nope'"), id="set-unknown-key"),
    pytest.param(Case(sets=("seed",), says="key.path=value"), id="set-without-equals"),
    # --- models and the baseline
    pytest.param(
        Case(put("baseline", "nobody"), where=": baseline: ", says="'nobody' is not a model"), id="baseline-unknown"
    ),
    pytest.param(Case(drop("models.tuned"), where=": models: ", says="at least two models"), id="single-model"),
    pytest.param(
        Case(
            put("models.tuned.backend", "remote"), where=": models.tuned.backend: ", says="undeclared backend 'remote'"
        ),
        id="model-backend-undeclared",
    ),
    pytest.param(
        Case(
            put("models.tuned.model", "./no-such-model"), where=": models.tuned.model: ", says="model folder not found"
        ),
        id="model-folder-missing",
    ),
    pytest.param(
        Case(
            put("models.tuned", {"backend": "local", "checkpoints": "ckpt/step-*"}),
            where=": models.tuned.checkpoints: ",
            says="matches no folder",
        ),
        id="checkpoints-match-nothing",
    ),
    pytest.param(
        Case(
            put("models.tuned", {"backend": "local", "checkpoints": "ckpt/step-*"}),
            folders=("ckpt/step-1+", "ckpt/step-2"),
            where=": models.tuned.checkpoints: ",
            says="no config.json",
        ),
        id="checkpoints-folder-not-a-model",
    ),
    pytest.param(
        Case(
            put("models.tuned", {"backend": "api", "checkpoints": "ckpt/step-*"}),
            folders=("ckpt/step-1+",),
            where=": models.tuned.checkpoints: ",
            says="vllm backend",
        ),
        id="checkpoints-on-openai",
    ),
    pytest.param(
        Case(
            put("models.tuned.checkpoints", "ckpt/step-*"),
            folders=("ckpt/step-1+",),
            where=": models.tuned: ",
            says="not both",
        ),
        id="model-and-checkpoints",
    ),
    # --- the judge
    pytest.param(
        Case(put("judge.jury", {"local": 1}), where=": judge: ", says="not both"), id="judge-backend-and-jury"
    ),
    pytest.param(
        Case(put("judge", {"ensemble": 1}), where=": judge: ", says="one of them is required"), id="judge-neither"
    ),
    pytest.param(
        Case(put("judge.backend", "remote"), where=": judge.backend: ", says="undeclared backend 'remote'"),
        id="judge-backend-undeclared",
    ),
    pytest.param(
        Case(put("judge", {"jury": {"local": 1, "y": 1}}), where=": judge.jury.y: ", says="undeclared backend 'y'"),
        id="jury-backend-undeclared",
    ),
    pytest.param(
        Case(
            put("judge", {"jury": {"local": 1}, "calibration": "cal.json"}),
            files={"cal.json": "{}"},
            where=": judge.calibration: ",
            says="one judge",
        ),
        id="calibration-with-jury",
    ),
    pytest.param(
        Case(put("judge.calibration", "no-cal.json"), where=": judge.calibration: ", says="not found: no-cal.json"),
        id="calibration-missing",
    ),
    pytest.param(
        Case(put("judge.few_shot", 1), where=": judge.few_shot: ", says="the constitution has 0"),
        id="few-shot-too-many",
    ),
    # --- the constitution and the axes
    pytest.param(
        Case(put("constitution", "no-constitution.yaml"), where=": constitution: ", says="not found"),
        id="constitution-missing",
    ),
    pytest.param(
        Case(
            put("constitution", "tiny.yaml"),
            files={"tiny.yaml": yaml.safe_dump(NO_COMPARISON)},
            where=": axes.harmless: ",
            says="no principle of tiny.yaml has a 'comparison' question",
        ),
        id="axis-without-question",
    ),
    pytest.param(Case(put("axes", {}), where=": axes: ", says="non-empty"), id="axes-empty"),
    pytest.param(
        Case(put("axes.helpful.prompts", "no-prompts.jsonl"), where=": axes.helpful.prompts: ", says="not found"),
        id="prompts-missing",
    ),
    pytest.param(
        Case(
            put("axes.helpful.prompts", [HELPFUL, "no-prompts.jsonl"]),
            where=": axes.helpful.prompts[1]: ",
            says="not found: no-prompts.jsonl",
        ),
        id="prompts-list-item-missing",
    ),
    pytest.param(
        Case(
            put("axes.helpful.prompts", "empty.jsonl"),
            files={"empty.jsonl": ""},
            file="empty.jsonl",
            says="file is empty",
        ),
        id="prompts-empty",
    ),
    pytest.param(
        Case(
            put("axes.helpful.prompts", ["ok.jsonl", "bad.jsonl"]),
            files={"ok.jsonl": '{"prompt": "Hi?"}\n', "bad.jsonl": '{"prompt": "Hello?"}\n{"prompt": oops\n'},
            file="bad.jsonl",
            where=":2: ",
            says="JSON",
        ),
        id="prompt-line-not-json",
    ),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write_case(case: Case, root: Path, tiny_model: Path) -> None:
    for name, text in (case.files or {}).items():
        (root / name).write_text(text)
    for folder in case.folders:
        path = root / folder.rstrip("+")
        path.mkdir(parents=True)
        if folder.endswith("+"):
            shutil.copy(tiny_model / "config.json", path / "config.json")
    if isinstance(case.edit, str):
        text = case.edit
    else:
        doc = copy.deepcopy(base_eval(tiny_model))
        if case.edit is not None:
            case.edit(doc)
        text = yaml.safe_dump(doc, sort_keys=False)
    (root / EVAL).write_text(text)


@pytest.mark.parametrize("case", CASES)
def test_bad_eval_input(
    case: Case, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_case(case, tmp_path, tiny_model)
    run_dir = tmp_path / "run"
    before = snapshot(tmp_path)

    code = main(["eval", EVAL, "--run-dir", str(run_dir), *[x for s in case.sets for x in ("--set", s)]])

    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, f"exit {code}, stderr: {captured.err}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    prefix = f"{case.file}{case.where}"  # a file the eval names is shown as found beside it: here, its name
    assert lines[0].startswith(prefix), f"expected {prefix!r} at the start of {lines[0]!r}"
    assert lines[0][len(prefix) :].strip() and case.says in lines[0][len(prefix) :], lines[0]
    assert captured.out == ""
    assert not run_dir.exists(), "bad input must not create the run directory"
    assert snapshot(tmp_path) == before, "bad input must not write or change any file"


def test_validate_accepts_a_valid_eval_file(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / EVAL).write_text(yaml.safe_dump(base_eval(tiny_model)))

    code = main(["validate", EVAL])

    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "ok (eval 'bad-inputs': models base, tuned; axes harmless, helpful)" in captured.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("link", [False, True], ids=["copies", "symlinks"])
def test_checkpoints_are_rated_in_step_order(
    link: bool, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    for name in ("step-2", "step-10", "step-1"):  # made out of order: the step, not the name, orders them
        if link:
            (tmp_path / "ckpt" / name).symlink_to(tiny_model, target_is_directory=True)
        else:
            shutil.copytree(tiny_model, tmp_path / "ckpt" / name)
    doc = base_eval(tiny_model)
    doc["models"]["tuned"] = {"backend": "local", "checkpoints": "ckpt/step-*"}
    (tmp_path / EVAL).write_text(yaml.safe_dump(doc))

    cfg = eval_config.load(tmp_path / EVAL)

    assert list(cfg.models) == ["base", "tuned@step-1", "tuned@step-2", "tuned@step-10"]
    checkpoints = [cfg.models[f"tuned@step-{n}"] for n in (1, 2, 10)]
    assert [m.step for m in checkpoints] == [1, 2, 10]
    assert {m.series for m in checkpoints} == {"tuned"}
    assert cfg.models["base"].series == "base" and cfg.models["base"].step is None
    for model in checkpoints:
        assert model.backend.type == "vllm"
        assert Path(model.backend.model).is_absolute()
        assert (Path(model.backend.model) / "config.json").is_file()
    assert json.loads((Path(checkpoints[0].backend.model) / "config.json").read_text())
