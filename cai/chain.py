"""Chains: pipeline runs, trainings and evals in order, each step reading what earlier steps wrote (for
example SL-CAI data -> SFT -> RL-CAI labels from the SFT model -> reward model -> DPO -> ratings of
the base, SFT and DPO models).

A chain file (a `steps:` list) runs with `cai run` like a pipeline. Each step is the very command a
user would type, `cai run PIPELINE --run-dir DIR`, `cai eval EVAL --run-dir DIR` or
`cai train KIND CONFIG --set output_dir=DIR`,
with DIR a folder of the chain's workdir named after the step; `${step}` in a later step's `set` is
that folder. A `repeat` step runs its steps `times` rounds over, round R's in WORKDIR/round-R/, with
`${round}` and `${prev.STEP}` (the previous round's folder) known in their `set`. Rerunning the chain skips the steps that finished with the same command and resumes
the one that did not, as its own command does; a finished step whose command changed is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.core.files import existing_path, load_yaml, validate
from cai.core.overrides import apply_overrides
from cai.judge import report

STEP_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # the cai command line, without display flags


@dataclass(frozen=True)
class Chain:
    file: Path
    name: str
    workdir: Path
    steps: tuple[Step, ...]


def is_chain(path: str | Path) -> bool:
    doc = load_yaml(Path(path))
    return isinstance(doc, dict) and "steps" in doc


def load(path: str | Path, overrides: list[str] = (), workdir: Path | None = None, limit: int | None = None) -> Chain:
    file = Path(path)
    name = str(file)
    doc = apply_overrides(load_yaml(file), list(overrides), name)
    validate(doc, "chain", name)
    root = (workdir or Path(doc.get("workdir", f"runs/{doc['name']}")).expanduser()).resolve()
    folders: dict[str, Path] = {}  # each step's folder; a repeated step's is its last round's
    taken: set[str] = set()
    steps: list[Step] = []

    def named(spec: dict[str, Any], where: str) -> None:
        if spec["name"] in taken:
            raise InputError(name, f"{where}.name", f"a second step named {spec['name']!r}")
        taken.add(spec["name"])

    for index, spec in enumerate(doc["steps"]):
        where = f"steps[{index}]"
        named(spec, where)
        if "repeat" not in spec:
            steps.append(_step(spec, root / spec["name"], _References(folders), file, where, limit))
            folders[spec["name"]] = root / spec["name"]
            continue
        block = spec["repeat"]
        inner_names = {inner["name"] for inner in block["steps"]}
        for k, inner in enumerate(block["steps"]):
            if "repeat" in inner:
                raise InputError(name, f"{where}.repeat.steps[{k}]", "a repeat block inside another is not supported")
            named(inner, f"{where}.repeat.steps[{k}]")
        previous: dict[str, Path] = {}
        for round_number in range(1, block["times"] + 1):
            current: dict[str, Path] = {}
            for k, inner in enumerate(block["steps"]):
                folder = root / f"round-{round_number}" / inner["name"]
                refs = _References({**folders, **current}, round_number, previous, inner_names)
                step = _step(inner, folder, refs, file, f"{where}.repeat.steps[{k}]", limit)
                steps.append(Step(f"round-{round_number}/{inner['name']}", step.argv))
                current[inner["name"]] = folder
            previous = current
        folders.update(previous)
    return Chain(file=file, name=doc["name"], workdir=root, steps=tuple(steps))


@dataclass(frozen=True)
class _References:
    """What `${...}` in a step's `set` may name: earlier steps' folders and, inside a repeat block, the
    round's number (`${round}`) and the previous round's folder of one of the block's steps (`${prev.STEP}`)."""

    folders: dict[str, Path]
    round: int | None = None  # None: outside a repeat block
    previous: dict[str, Path] = field(default_factory=dict)  # empty in round 1
    block: set[str] = field(default_factory=set)

    def expand(self, text: str, file: str, where: str) -> str | None:
        """The line with its references replaced; None for a line naming `${prev.STEP}` in round 1, which
        has no previous round: the file's own value stands."""
        dropped = False

        def value(match: re.Match) -> str:
            nonlocal dropped
            ref = match.group(1)
            if ref == "round" or ref.startswith("prev."):
                if self.round is None:
                    raise InputError(file, where, f"${{{ref}}} is known only inside a repeat block")
                if ref == "round":
                    return str(self.round)
                if ref[len("prev.") :] not in self.block:
                    raise InputError(file, where, f"${{{ref}}} names no step of this repeat block")
                if not self.previous:
                    dropped = True
                    return ""
                return str(self.previous[ref[len("prev.") :]])
            if ref not in self.folders:
                raise InputError(file, where, f"${{{ref}}} names no earlier step")
            return str(self.folders[ref])

        expanded = STEP_REF.sub(value, text)
        return None if dropped else expanded


def _step(spec: dict[str, Any], folder: Path, refs: _References, file: Path, where: str, limit: int | None) -> Step:
    """One step's `cai` command line, writing in `folder`."""
    name = str(file)
    sets = [line for text in spec.get("set", []) if (line := refs.expand(text, name, f"{where}.set")) is not None]
    if "run" in spec or "eval" in spec:
        command = "run" if "run" in spec else "eval"
        target = existing_path(spec[command], file, name, f"{where}.{command}").resolve()
        argv = [command, str(target), "--run-dir", str(folder)]
        step_limit = limit or spec.get("limit")
        if step_limit is not None:
            argv += ["--limit", str(step_limit)]
    else:
        config = existing_path(spec["config"], file, name, f"{where}.config").resolve()
        argv = ["train", spec["train"], str(config)]
        sets.append(f"output_dir={folder}")  # last: the chain decides where each step writes
    for text in sets:
        argv += ["--set", text]
    return Step(spec["name"], tuple(argv))


def run(chain: Chain, run_command: Callable[[list[str]], int], quiet: bool = False, verbose: bool = False) -> int:
    """Run the steps in order through `run_command` (the `cai` command's own entry point, which the CLI
    passes in: this module sits below it); stop at the first step that fails, with its exit code. `quiet`
    and `verbose` reach the steps that take them (`cai run` both, `cai train` only `--verbose`)."""
    state_path = chain.workdir / report.CHAIN_STATE
    state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {"steps": {}}
    for number, step in enumerate(chain.steps, 1):
        recorded = state["steps"].get(step.name)
        if recorded is not None and recorded["argv"] == list(step.argv):
            print(f"[{number}/{len(chain.steps)}] {step.name}: done earlier, skipped")
            continue
        if recorded is not None:
            # Its outputs were made another way, and later steps were built on them: redoing only this
            # one would leave a chain whose parts disagree.
            later = [str(chain.workdir / s.name) for s in chain.steps[number - 1 :]]
            raise InputError(
                str(chain.file),
                f"steps[{number - 1}]",
                f"changed since it ran: delete {', '.join(later)} to run it and the steps after it again",
            )
        print(f"[{number}/{len(chain.steps)}] {step.name}: cai {' '.join(step.argv)}", flush=True)
        options = (["--quiet"] if quiet and step.argv[0] in ("run", "eval") else []) + (
            ["--verbose"] if verbose else []
        )
        code = run_command([*step.argv, *options])
        if code != 0:
            print(f"chain {chain.name}: step {step.name} stopped with exit {code}; rerun the same command to resume it")
            return code
        state["steps"][step.name] = {
            "argv": list(step.argv),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        chain.workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(state_path, json.dumps(state, indent=2) + "\n")
    print(
        f"chain {chain.name}: {len(chain.steps)} steps done in {chain.workdir}; report: {report.write_chain(chain.workdir)}"
    )
    return 0
