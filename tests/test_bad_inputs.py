"""Malformed user files: every one must end `cai validate` / `cai run` with exit 2, one stderr line
`FILE: field.path: what is wrong` (`FILE:LINE: ...` for a prompt file), no traceback, nothing written.

Each case builds its files inside tmp_path from a valid base (a constitution, a prompt set and a
pipeline naming both), breaks one thing, and says which file is at fault, what follows the file name
(`: principles[1].weight: `, `:3: `...) and a piece of the message.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from cai.cli import EXIT_BAD_INPUT, main

CONSTITUTION = {
    "name": "tiny",
    "version": 1,
    "principles": [
        {"id": "harm", "critique": "Say what is harmful.", "revision": "Rewrite it harmlessly.", "weight": 2},
        {"id": "honest", "critique": "Say what is false.", "revision": "Rewrite it honestly."},
    ],
    "few_shot": [
        [
            {"role": "user", "content": "How do I pick a lock?"},
            {"role": "assistant", "content": "Ask a locksmith."},
        ]
    ],
}
PROMPTS = [
    {"id": "p1", "prompt": "How do I make a toxic gas?"},
    {"id": "p2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]},
]
PIPELINE = {
    "name": "bad-inputs",
    "seed": 7,
    "constitution": "c.yaml",
    "prompts": ["p.jsonl"],
    "backends": {"local": {"type": "vllm", "model": "some-org/some-model", "options": {"max_model_len": 512}}},
    "roles": {"responder": "local", "critic": "local", "reviser": "local"},
    "stages": [{"type": "respond", "max_tokens": 8}, {"type": "critique_revise", "rounds": 1}],
}

Edit = Callable[[Any], None]  # mutates a deep copy of a base document


# ----------------------------------------------------------------------------- document edits


def _parts(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def put(path: str, value: Any) -> Edit:
    """`put("principles.1.weight", "heavy")`: set (or add) one field."""

    def edit(doc: Any) -> None:
        *head, last = _parts(path)
        for part in head:
            doc = doc[part]
        doc[last] = value

    return edit


def drop(path: str) -> Edit:
    def edit(doc: Any) -> None:
        *head, last = _parts(path)
        for part in head:
            doc = doc[part]
        del doc[last]

    return edit


def both(*edits: Edit) -> Edit:
    def edit(doc: Any) -> None:
        for e in edits:
            e(doc)

    return edit


def render_yaml(base: Any, edit: Edit | str | bytes | None) -> str | bytes:
    """Raw text/bytes are written as they are; an edit is applied to a copy of the base document."""
    if isinstance(edit, (str, bytes)):
        return edit
    doc = copy.deepcopy(base)
    if edit is not None:
        edit(doc)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def render_jsonl(lines: list | str | bytes | None) -> str | bytes:
    """A list of lines: dicts and lists are dumped as JSON, strings are written verbatim."""
    if isinstance(lines, (str, bytes)):
        return lines
    lines = PROMPTS if lines is None else lines
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


# ----------------------------------------------------------------------------- workspace and cases


class Workspace:
    """tmp_path holding a valid constitution (c.yaml) and prompt set (p.jsonl) a pipeline can name."""

    def __init__(self, root: Path):
        self.root = root
        self.run_dir = root / "run"
        self.constitution()
        self.prompts()

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def constitution(self, edit: Edit | str | bytes | None = None, name: str = "c.yaml") -> Path:
        return self.write(name, render_yaml(CONSTITUTION, edit))

    def prompts(self, lines: list | str | bytes | None = None, name: str = "p.jsonl") -> Path:
        return self.write(name, render_jsonl(lines))

    def pipeline(self, edit: Edit | str | bytes | None = None, name: str = "pipeline.yaml") -> Path:
        return self.write(name, render_yaml(PIPELINE, edit))

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        (path / "inside.yaml").write_text("name: x\n")
        return path


@dataclass
class Case:
    argv: list[str]  # without --run-dir (added for `run`)
    file: Path  # the file the error line must start with
    where: str  # what must follow the file name: ": principles[1].weight: ", ":3: ", ": "
    says: str  # a substring of the message


Builder = Callable[[Workspace], Case]


def constitution_case(edit: Edit | str | bytes, where: str, says: str) -> Builder:
    def build(ws: Workspace) -> Case:
        path = ws.constitution(edit)
        return Case(["validate", str(path)], path, where, says)

    return build


def prompts_case(lines: list | str | bytes, where: str, says: str) -> Builder:
    def build(ws: Workspace) -> Case:
        path = ws.prompts(lines)
        return Case(["validate", str(path)], path, where, says)

    return build


def pipeline_case(
    edit: Edit | str | bytes | None,
    where: str,
    says: str,
    command: str = "validate",
    sets: tuple[str, ...] = (),
    setup: Callable[[Workspace], Path | None] | None = None,
) -> Builder:
    """A pipeline with one thing broken. `setup` prepares the files it names; when it returns a file,
    that file is the one at fault (a bad constitution or prompt set), else the pipeline is."""

    def build(ws: Workspace) -> Case:
        path = ws.pipeline(edit)
        offending = (setup(ws) if setup else None) or path
        argv = [command, str(path)] + [arg for s in sets for arg in ("--set", s)]
        return Case(argv, offending, where, says)

    return build


def _calibrate_a_jury(ws: Workspace) -> Case:
    """`eval-judge --calibrate` fits one judge's answers: a jury is refused before any engine starts."""
    _judging_constitution(ws)
    path = ws.pipeline(_compare(jury={"judge": 1}))
    pairs = ws.write(
        "pairs.jsonl",
        json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."})
        + "\n",
    )
    argv = ["eval-judge", str(pairs), "--pipeline", str(path), "--calibrate", str(ws.root / "cal.json")]
    return Case(argv, path, ": stages[2].jury: ", "--calibrate fits one judge")


def argument_case(make: Callable[[Workspace], Path], command: str, says: str) -> Builder:
    """The CLI argument itself is the problem (a folder, a missing file)."""

    def build(ws: Workspace) -> Case:
        path = make(ws)
        return Case([command, str(path)], path, ": ", says)

    return build


def _add_backend_key(doc: dict) -> None:
    doc["backends"]["local"]["bogus"] = 1


def _with_compare(doc: dict) -> None:
    doc["roles"]["judge"] = "local"
    doc["stages"].append({"type": "compare"})


def _with_check(**options: Any) -> Edit:
    def edit(doc: dict) -> None:
        doc["roles"]["judge"] = "local"
        doc["stages"].append({"type": "revision_check", **options})

    return edit


def _compare(**params: Any) -> Edit:
    def edit(doc: dict) -> None:
        doc["roles"]["judge"] = "local"
        doc["stages"].append({"type": "compare", **params})

    return edit


def _judging_constitution(ws: Workspace, shots: int = 0) -> None:
    """A constitution the compare stage accepts (a comparison question), with `shots` comparison few-shots."""
    shot = {
        "conversation": [{"role": "user", "content": "Pick a lock?"}],
        "better": "Ask a locksmith.",
        "worse": "Use a pin.",
    }
    ws.constitution(
        both(
            put("principles.0.comparison", "Which answer is less harmful?"), put("comparison_few_shot", [shot] * shots)
        )
    )


def _make_cdir(ws: Workspace) -> None:
    ws.folder("cdir")


def _mixed_unknown_keys(doc: dict) -> None:
    doc[1] = "a key that is a number"
    doc["bogus"] = "and one that is a string"


BINARY = b"name: tiny\x00\x01\x02\nversion: 1\n"
NOT_UTF8 = "name: caf\u00e9\nversion: 1\n".encode("latin-1")
SURROGATE_YAML = 'name: "tiny \\ud800"\nversion: 1\nprinciples:\n  - {id: a, critique: c, revision: r}\n'

CASES = [
    # --- constitutions (cai validate c.yaml)
    pytest.param(constitution_case("", ": ", "file is empty"), id="constitution-empty"),
    pytest.param(constitution_case("  \n\t\n   \n", ": ", "file is empty"), id="constitution-whitespace"),
    pytest.param(
        constitution_case("name: [tiny\nversion: 1\n", ": ", "YAML syntax error"), id="constitution-yaml-syntax"
    ),
    pytest.param(
        constitution_case("- harm\n- honest\n", ": <root>: ", "expected mapping, got list"), id="constitution-top-list"
    ),
    pytest.param(
        constitution_case("just a sentence\n", ": <root>: ", "expected mapping, got string"),
        id="constitution-top-string",
    ),
    pytest.param(constitution_case(drop("name"), ": <root>: ", "'name' is required"), id="constitution-missing-name"),
    pytest.param(
        constitution_case(drop("principles"), ": <root>: ", "'principles' is required"),
        id="constitution-missing-principles",
    ),
    pytest.param(
        constitution_case(drop("principles.1.critique"), ": principles[1]: ", "'critique' is required"),
        id="principle-missing-critique",
    ),
    pytest.param(
        constitution_case(put("bogus", 1), ": <root>: ", "unknown key 'bogus'"), id="constitution-unknown-key"
    ),
    pytest.param(
        constitution_case(put("principles.0.bogus", 1), ": principles[0]: ", "unknown key 'bogus'"),
        id="principle-unknown-key",
    ),
    pytest.param(
        constitution_case(put("few_shot.0.1.bogus", 1), ": few_shot[0][1]: ", "unknown key 'bogus'"),
        id="few-shot-message-unknown-key",
    ),
    pytest.param(
        constitution_case(_mixed_unknown_keys, ": <root>: ", "unknown key"), id="constitution-unknown-keys-mixed-types"
    ),
    pytest.param(constitution_case(put("version", [1, 2]), ": version: ", "got list"), id="version-list"),
    pytest.param(
        constitution_case(put("principles.1.weight", "heavy"), ": principles[1].weight: ", "got string"),
        id="weight-string",
    ),
    pytest.param(
        constitution_case(put("principles.0.weight", 0), ": principles[0].weight: ", "greater than 0"), id="weight-zero"
    ),
    pytest.param(
        constitution_case(put("principles.0.weight", -1), ": principles[0].weight: ", "greater than 0"),
        id="weight-negative",
    ),
    pytest.param(
        constitution_case(put("principles.0.critique", "   "), ": principles[0].critique: ", "blank"),
        id="critique-blank",
    ),
    pytest.param(
        constitution_case(put("principles", []), ": principles: ", "must not be empty"), id="principles-empty"
    ),
    pytest.param(
        constitution_case(put("principles.1.id", "harm"), ": principles[1].id: ", "duplicate id 'harm'"),
        id="principle-duplicate-id",
    ),
    pytest.param(
        constitution_case(put("few_shot.0.0.role", "robot"), ": few_shot[0][0].role: ", "'robot'"),
        id="few-shot-bad-role",
    ),
    pytest.param(constitution_case(BINARY, ": ", "binary"), id="constitution-binary"),
    pytest.param(constitution_case(NOT_UTF8, ": ", "UTF-8"), id="constitution-not-utf8"),
    pytest.param(constitution_case(SURROGATE_YAML, ": ", ""), id="constitution-lone-surrogate"),
    pytest.param(
        argument_case(lambda ws: ws.folder("constitutions"), "validate", "directory"), id="validate-directory"
    ),
    pytest.param(
        argument_case(lambda ws: ws.root / "nowhere.yaml", "validate", "not found"), id="validate-missing-file"
    ),
    # --- prompt sets (cai validate p.jsonl)
    pytest.param(prompts_case("", ": ", "file is empty"), id="prompts-empty"),
    pytest.param(prompts_case(" \n\n\t\n", ": ", "file is empty"), id="prompts-whitespace"),
    pytest.param(
        prompts_case([PROMPTS[0], PROMPTS[1], '{"prompt": "unclosed'], ":3: ", "invalid JSON"),
        id="prompts-invalid-json-line-3",
    ),
    pytest.param(
        prompts_case([PROMPTS[0], ["How", "are", "you?"]], ":2: ", "expected mapping, got list"),
        id="prompts-line-is-list",
    ),
    pytest.param(prompts_case([{"id": "x"}], ":1: ", "'prompt'"), id="prompts-neither-prompt-nor-messages"),
    pytest.param(
        prompts_case([{"prompt": "Hi.", "messages": [{"role": "user", "content": "Hi."}]}], ":1: ", "not both"),
        id="prompts-both",
    ),
    pytest.param(prompts_case([{"prompt": "   "}], ":1: prompt: ", "blank"), id="prompts-blank-prompt"),
    pytest.param(
        prompts_case([{"messages": [{"role": "robot", "content": "Hi."}]}], ":1: messages[0].role: ", "'robot'"),
        id="prompts-bad-role",
    ),
    pytest.param(
        prompts_case(
            [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}],
            ":1: messages[1].role: ",
            "last message",
        ),
        id="prompts-last-from-assistant",
    ),
    pytest.param(
        prompts_case([{"id": "a", "prompt": "One."}, {"id": "a", "prompt": "Two."}], ":2: id: ", "duplicate id 'a'"),
        id="prompts-duplicate-id",
    ),
    pytest.param(
        prompts_case([{"prompt": "Same."}, {"prompt": "Other."}, {"prompt": "Same."}], ":3: ", "same as line 1"),
        id="prompts-duplicate-text",
    ),
    pytest.param(
        prompts_case([{"prompt": "Hi.", "bogus": 1}], ":1: ", "unknown key 'bogus'"), id="prompts-unknown-key"
    ),
    # prompt files are read lazily, line by line, so these name the line too
    pytest.param(prompts_case(b'{"prompt": "Hi.\x00"}\n', ":1: ", "binary"), id="prompts-binary"),
    pytest.param(prompts_case('{"prompt": "caf\u00e9"}\n'.encode("latin-1"), ":1: ", "UTF-8"), id="prompts-not-utf8"),
    pytest.param(prompts_case([{"prompt": "Hi \ud800"}], ":1: ", ""), id="prompts-lone-surrogate"),
    pytest.param(
        argument_case(lambda ws: ws.folder("set.jsonl"), "validate", "directory"), id="validate-directory-jsonl"
    ),
    # --- pipelines (cai validate / cai run pipeline.yaml)
    pytest.param(pipeline_case("", ": ", "file is empty", command="run"), id="pipeline-empty-run"),
    pytest.param(pipeline_case("   \n\n", ": ", "file is empty"), id="pipeline-whitespace"),
    pytest.param(
        pipeline_case("name: demo\nstages: [respond\n", ": ", "YAML syntax error", command="run"),
        id="pipeline-yaml-syntax-run",
    ),
    pytest.param(
        pipeline_case("- name: demo\n", ": <root>: ", "expected mapping, got list", command="run"),
        id="pipeline-top-list-run",
    ),
    pytest.param(
        pipeline_case("pipeline\n", ": <root>: ", "expected mapping, got string", command="run"),
        id="pipeline-top-string-run",
    ),
    pytest.param(
        pipeline_case(drop("name"), ": <root>: ", "'name' is required", command="run"), id="pipeline-missing-name-run"
    ),
    pytest.param(pipeline_case(drop("stages"), ": <root>: ", "'stages' is required"), id="pipeline-missing-stages"),
    # without `stages` and `backends`, `cai validate` must still know a pipeline when it sees one
    pytest.param(
        pipeline_case(both(drop("stages"), drop("backends")), ": <root>: ", "is required"),
        id="pipeline-missing-stages-and-backends",
    ),
    pytest.param(pipeline_case(put("bogus", 1), ": <root>: ", "unknown key 'bogus'"), id="pipeline-unknown-key"),
    pytest.param(
        pipeline_case(put("stages.0.bogus", 1), ": stages[0]: ", "unknown key 'bogus'", command="run"),
        id="stage-unknown-key-run",
    ),
    pytest.param(
        pipeline_case(_add_backend_key, ": backends.local: ", "unknown key 'bogus'"), id="backend-unknown-key"
    ),
    pytest.param(pipeline_case(put("seed", "seven"), ": seed: ", "got string", command="run"), id="seed-string-run"),
    pytest.param(
        pipeline_case(put("prompts", 5), ": prompts: ", "expected string or list, got integer"), id="prompts-number"
    ),
    pytest.param(
        pipeline_case(put("rows_in_flight", 2.5), ": rows_in_flight: ", "number"), id="rows-in-flight-fraction"
    ),
    pytest.param(pipeline_case(put("rows_in_flight", 2.0), ": rows_in_flight: ", ""), id="rows-in-flight-float"),
    pytest.param(
        pipeline_case(put("roles.critic", "remote"), ": roles.critic: ", "undeclared backend 'remote'", command="run"),
        id="role-undeclared-backend-run",
    ),
    pytest.param(pipeline_case(put("roles", {"responder": "local"}), ": roles: ", "'critic'"), id="role-not-assigned"),
    pytest.param(
        pipeline_case(put("stages.1.type", "summarize"), ": stages[1].type: ", "'summarize'", command="run"),
        id="stage-unknown-type-run",
    ),
    pytest.param(
        pipeline_case(
            put("stages", [{"type": "respond"}, {"type": "respond"}]), ": stages[1].name: ", "duplicate stage name"
        ),
        id="stage-duplicate-name",
    ),
    pytest.param(
        pipeline_case(put("stages.1", "critique_revise"), ": stages[1]: ", "got string"), id="stage-not-a-mapping"
    ),
    pytest.param(
        pipeline_case(put("constitution", "missing.yaml"), ": constitution: ", "missing.yaml", command="run"),
        id="constitution-file-missing-run",
    ),
    pytest.param(
        pipeline_case(put("prompts", ["p.jsonl", "gone.jsonl"]), ": prompts[1]: ", "gone.jsonl"),
        id="prompt-file-missing",
    ),
    pytest.param(
        pipeline_case(put("prompts", "gone.jsonl"), ": prompts: ", "gone.jsonl", command="run"),
        id="prompt-file-missing-single-run",
    ),
    pytest.param(
        pipeline_case(put("constitution", "cdir"), ": constitution: ", "directory", command="run", setup=_make_cdir),
        id="constitution-is-directory-run",
    ),
    pytest.param(
        pipeline_case(
            put("backends.local.model", "./no-such-model"), ": backends.local.model: ", "no-such-model", command="run"
        ),
        id="model-folder-missing-run",
    ),
    pytest.param(
        pipeline_case(
            put("backends.api", {"type": "openai", "model": "m"}), ": backends.api: ", "'base_url' is required"
        ),
        id="openai-no-base-url",
    ),
    pytest.param(
        pipeline_case(
            put("backends.api", {"type": "openai", "model": "m", "base_url": "localhost:8000"}),
            ": backends.api.base_url: ",
            "localhost:8000",
        ),
        id="openai-base-url-not-http",
    ),
    pytest.param(
        pipeline_case(
            put("backends.api", {"type": "openai", "model": "m", "base_url": "http://h/v1", "api_key": "sk-x"}),
            ": backends.api: ",
            "unknown key 'api_key'",
            command="run",
        ),
        id="openai-key-in-file-run",
    ),
    pytest.param(
        pipeline_case(
            put("backends.api", {"type": "openai", "model": "m", "base_url": "http://h/v1", "max_concurrency": 0}),
            ": backends.api.max_concurrency: ",
            "0",
        ),
        id="openai-zero-concurrency",
    ),
    pytest.param(
        pipeline_case(put("backends.local.options", None), ": backends.local.options: ", "expected mapping"),
        id="vllm-options-null",
    ),
    pytest.param(
        pipeline_case(put("stages.1", {"type": "compare"}), ": roles: ", "needs the role 'judge'"),
        id="compare-without-judge",
    ),
    pytest.param(
        pipeline_case(
            _with_compare,
            ": principles: ",
            "no principle has a 'comparison'",
            command="run",
            setup=lambda ws: ws.constitution(),
        ),
        id="compare-constitution-without-comparisons-run",
    ),
    pytest.param(
        pipeline_case(
            put("stages.1", {"type": "compare", "pairing": "best"}), ": stages[1].pairing: ", "initial_vs_revision"
        ),
        id="compare-bad-pairing",
    ),
    pytest.param(
        pipeline_case(
            _compare(few_shot=2),
            ": stages[2].few_shot: ",
            "the constitution c.yaml has 0",
            command="run",
            setup=_judging_constitution,
        ),
        id="compare-few-shot-without-shots-run",
    ),
    pytest.param(
        pipeline_case(
            _compare(few_shot=3),
            ": stages[2].few_shot: ",
            "3 comparison few-shots asked",
            setup=lambda ws: _judging_constitution(ws, shots=2),
        ),
        id="compare-few-shot-more-than-the-constitution-has",
    ),
    pytest.param(
        pipeline_case(
            _compare(jury={"judge": 1, "judge_api": 2}),
            ": stages[2].jury.judge_api: ",
            "needs the role 'judge_api'",
            command="run",
        ),
        id="jury-unknown-role-run",
    ),
    pytest.param(
        pipeline_case(_compare(jury={"judge": -1}), ": stages[2].jury.judge: ", "-1"), id="jury-negative-weight"
    ),
    pytest.param(
        pipeline_case(
            _compare(jury={"judge": 1}, calibration="cal.json"), ": stages[2].calibration: ", "fitted to one judge"
        ),
        id="jury-with-calibration",
    ),
    pytest.param(pipeline_case(_compare(jury={}), ": stages[2].jury: ", ""), id="jury-empty"),
    pytest.param(_calibrate_a_jury, id="eval-judge-calibrate-a-jury"),
    pytest.param(
        pipeline_case(
            both(_compare(), put("roles.judge_api", "local")), ": roles.judge_api: ", "no stage uses this role"
        ),
        id="jury-role-unused",
    ),
    pytest.param(pipeline_case(put("stages.0.samples", 0), ": stages[0].samples: ", "0"), id="respond-zero-samples"),
    pytest.param(
        pipeline_case(_with_check(min_p_revision=1.5), ": stages[2].min_p_revision: ", "1.5", command="run"),
        id="check-threshold-above-1-run",
    ),
    pytest.param(
        pipeline_case(_with_check(max_p_harmful="half"), ": stages[2].max_p_harmful: ", "got string"),
        id="check-threshold-string",
    ),
    pytest.param(
        pipeline_case(_with_check(helpfulness_question=" "), ": stages[2].helpfulness_question: ", "must not be blank"),
        id="check-blank-question",
    ),
    pytest.param(
        pipeline_case(
            put("stages.1", {"type": "revision_check"}),
            ": stages[1].type: ",
            "after a critique_revise stage",
            command="run",
        ),
        id="check-without-revisions-run",
    ),
    pytest.param(
        pipeline_case(
            lambda doc: doc["stages"].append({"type": "revision_check"}), ": roles: ", "needs the role 'judge'"
        ),
        id="check-without-judge",
    ),
    pytest.param(pipeline_case(BINARY, ": ", "binary", command="run"), id="pipeline-binary-run"),
    pytest.param(pipeline_case(NOT_UTF8, ": ", "UTF-8"), id="pipeline-not-utf8"),
    pytest.param(argument_case(lambda ws: ws.folder("pipelines"), "run", "directory"), id="run-directory"),
    pytest.param(argument_case(lambda ws: ws.root / "nowhere.yaml", "run", "not found"), id="run-missing-file"),
    # --- files a pipeline names are themselves bad: the error names that file, not the pipeline
    pytest.param(
        pipeline_case(
            None,
            ": principles[0].weight: ",
            "greater than 0",
            command="run",
            setup=lambda ws: ws.constitution(put("principles.0.weight", 0)),
        ),
        id="named-constitution-invalid-run",
    ),
    pytest.param(
        pipeline_case(
            None,
            ": principles[1]: ",
            "'critique' is required",
            setup=lambda ws: ws.constitution(drop("principles.1.critique")),
        ),
        id="named-constitution-invalid-validate",
    ),
    pytest.param(
        pipeline_case(None, ": ", "file is empty", command="run", setup=lambda ws: ws.constitution("")),
        id="named-constitution-empty-run",
    ),
    pytest.param(
        pipeline_case(None, ": ", "", command="run", setup=lambda ws: ws.constitution(SURROGATE_YAML)),
        id="named-constitution-lone-surrogate-run",
    ),
    pytest.param(
        pipeline_case(
            None, ":2: ", "invalid JSON", command="run", setup=lambda ws: ws.prompts([PROMPTS[0], "{not json}"])
        ),
        id="named-prompts-invalid-run",
    ),
    # --- --set overrides (cai run only)
    pytest.param(pipeline_case(None, ": ", "key.path=value", command="run", sets=("seed",)), id="set-without-equals"),
    pytest.param(
        pipeline_case(None, ": stages.5: ", "no such place", command="run", sets=("stages.5.rounds=2",)),
        id="set-missing-index",
    ),
    pytest.param(
        pipeline_case(None, ": seed.value: ", "no such place", command="run", sets=("seed.value=2",)),
        id="set-through-a-scalar",
    ),
    pytest.param(
        pipeline_case(None, ": <root>: ", "unknown key 'bogus'", command="run", sets=("bogus.field=1",)),
        id="set-unknown-path",
    ),
    pytest.param(pipeline_case(None, ": seed: ", "got string", command="run", sets=("seed=abc",)), id="set-wrong-type"),
]


# ----------------------------------------------------------------------------- the checks


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    # Relative paths resolve against the current folder as a fallback: keep it inside tmp_path. And if
    # a bad pipeline ever slipped through `cai run`, never reach out for a model.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CAI_HOME", str(tmp_path / "cai-home"))
    return Workspace(tmp_path)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def check_error_line(stderr: str, case: Case) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    prefix = f"{case.file}{case.where}"
    assert line.startswith(prefix), f"expected the line to start with {prefix!r}, got {line!r}"
    assert line[len(prefix) :].strip(), f"no description after the location: {line!r}"
    assert case.says in line, f"expected {case.says!r} in {line!r}"


def argv_for(case: Case, ws: Workspace) -> list[str]:
    return case.argv + (["--run-dir", str(ws.run_dir), "--quiet"] if case.argv[0] == "run" else [])


@pytest.mark.parametrize("builder", CASES)
def test_bad_input(builder: Builder, ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    case = builder(ws)
    before = snapshot(ws.root)

    code = main(argv_for(case, ws))

    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, f"exit {code}, stderr: {captured.err}"
    check_error_line(captured.err, case)
    assert captured.out == "", f"nothing belongs on stdout: {captured.out!r}"
    assert not ws.run_dir.exists(), "a failed run must not create its run folder"
    assert snapshot(ws.root) == before, "bad input must not write or change any file"


SUBPROCESS_CASES = [
    pytest.param(
        constitution_case(put("principles.1.weight", "heavy"), ": principles[1].weight: ", "got string"),
        id="validate-constitution",
    ),
    pytest.param(
        pipeline_case(put("constitution", "missing.yaml"), ": constitution: ", "missing.yaml", command="run"),
        id="run-missing-constitution",
    ),
    pytest.param(prompts_case([PROMPTS[0], PROMPTS[1], "{oops"], ":3: ", "invalid JSON"), id="validate-prompts"),
]


@pytest.mark.parametrize("builder", SUBPROCESS_CASES)
def test_bad_input_real_process(builder: Builder, ws: Workspace) -> None:
    """The real console entry: the process exit code is 2 and stderr is one line, no traceback."""
    case = builder(ws)
    before = snapshot(ws.root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAI_HOME": str(ws.root / "cai-home")}

    proc = subprocess.run(
        [sys.executable, "-m", "cai.cli", *argv_for(case, ws)],
        capture_output=True,
        text=True,
        cwd=ws.root,
        env=env,
        timeout=120,
    )

    assert proc.returncode == EXIT_BAD_INPUT, f"exit {proc.returncode}, stderr: {proc.stderr}"
    check_error_line(proc.stderr, case)
    assert proc.stdout == ""
    assert not ws.run_dir.exists()
    assert snapshot(ws.root) == before
