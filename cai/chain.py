"""Chains: pipeline runs, trainings and evals in order, each step reading what earlier steps wrote (for
example SL-CAI data -> SFT -> RL-CAI labels from the SFT model -> reward model -> DPO -> ratings of
the base, SFT and DPO models).

A chain file (a `steps:` list) runs with `cai run` like a pipeline. Each step is the very command a
user would type, `cai run PIPELINE --run-dir DIR`, `cai eval EVAL --run-dir DIR` or
`cai train KIND CONFIG --set output_dir=DIR`,
with DIR a folder of the chain's workdir named after the step; `${step}` in a later step's `set` is
that folder. Rerunning the chain skips the steps that finished with the same command and resumes
the one that did not, as its own command does; a finished step whose command changed is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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
    folders: dict[str, Path] = {}
    steps = []
    for index, spec in enumerate(doc["steps"]):
        where = f"steps[{index}]"
        if spec["name"] in folders:
            raise InputError(name, f"{where}.name", f"a second step named {spec['name']!r}")
        sets = [_expand(text, folders, name, f"{where}.set") for text in spec.get("set", [])]
        folder = root / spec["name"]
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
        steps.append(Step(spec["name"], tuple(argv)))
        folders[spec["name"]] = folder
    return Chain(file=file, name=doc["name"], workdir=root, steps=tuple(steps))


def _expand(text: str, folders: dict[str, Path], file: str, where: str) -> str:
    def folder(match: re.Match) -> str:
        if match.group(1) not in folders:
            raise InputError(file, where, f"${{{match.group(1)}}} names no earlier step")
        return str(folders[match.group(1)])

    return STEP_REF.sub(folder, text)


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
