"""Pipeline files: load, apply `--set` overrides, validate (including the files they name), resolve.
Prompt files are checked to exist here and read lazily by the run."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from cai import calibration
from cai import constitution as constitution_mod
from cai import prompts as prompts_mod
from cai.backends.base import BackendSpec
from cai.constitution import Constitution
from cai.errors import InputError
from cai.files import load_yaml, validate
from cai.models import EMBEDDED, looks_like_path
from cai.prompts import Prompt
from cai.stages import build

# Rows moving through the stages at once: enough to keep an engine's batch or an API's concurrency
# full while rows sit at different stages; memory is bounded by it, never by the dataset.
DEFAULT_ROWS_IN_FLIGHT = 256
STANDARD_ROLES = {"responder", "critic", "reviser", "judge"}  # any other role is a juror a stage names


@dataclass(frozen=True)
class StageConfig:
    type: str
    name: str
    params: dict[str, Any]


@dataclass
class PipelineConfig:
    file: Path
    raw: dict[str, Any]  # the validated document, overrides applied: recorded in the manifest
    name: str
    seed: int
    constitution_path: Path
    prompt_paths: list[Path]
    backends: dict[str, BackendSpec]
    roles: dict[str, str]
    stages: list[StageConfig]
    rows_in_flight: int
    output_dir: Path | None
    constitution: Constitution = field(repr=False, default=None)  # type: ignore[assignment]

    def prompts(self, limit: int | None = None) -> Iterator[Prompt]:
        """The prompts in input order, read and validated lazily (a bad line raises when reached)."""
        return itertools.islice(prompts_mod.iter_many(self.prompt_paths), limit)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`stages.1.rounds=2` or `stages[1].rounds=2` -> (["stages", 1, "rounds"], 2); values are YAML."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    parts: list[str | int] = []
    for piece in key.replace("[", ".").replace("]", "").split("."):
        if not piece:
            raise ValueError(f"--set {text!r}: empty part in key path")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        return parts, yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return parts, value


def apply_overrides(doc: Any, overrides: list[str], file: str) -> Any:
    doc = copy.deepcopy(doc)
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            raise InputError(file, None, str(exc)) from None
        target = doc
        for depth, part in enumerate(path[:-1]):
            where = ".".join(map(str, path[: depth + 1]))
            if isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            elif isinstance(target, dict) and isinstance(part, str):
                target = target.setdefault(part, {})
            else:
                raise InputError(file, where, f"--set {text!r}: no such place to set")
        last = path[-1]
        if isinstance(target, list) and isinstance(last, int) and last < len(target):
            target[last] = value
        elif isinstance(target, dict) and isinstance(last, str):
            target[last] = value
        else:
            raise InputError(file, ".".join(map(str, path)), f"--set {text!r}: no such place to set")
    return doc


def resolve_path(value: str, pipeline_file: Path) -> Path:
    """A path relative to the pipeline file's folder, else to the current folder (the project root)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for base in (pipeline_file.parent, Path.cwd()):
        if (base / p).exists():
            return base / p
    return pipeline_file.parent / p


def backend_spec(backend_name: str, b: dict[str, Any], file: Path, field_name: str) -> BackendSpec:
    """A backend entry (schema `$defs/backend`) as a BackendSpec; a local model folder must exist."""
    model = b["model"]
    local = b["type"] == "vllm"  # an API backend's model is a name the server knows, never a path here
    if local and model not in EMBEDDED and looks_like_path(model) and not resolve_path(model, file).is_dir():
        raise InputError(str(file), f"{field_name}.model", f"model folder not found: {model}")
    return BackendSpec(
        name=backend_name,
        type=b["type"],
        model=model,
        options=dict(b.get("options", {})),
        settings={k: v for k, v in b.items() if k not in ("type", "model", "options")},
        base_dirs=(str(file.parent.resolve()), str(Path.cwd())),
    )


def load(path: str | Path, overrides: list[str] = (), check_path: Callable[[Path, str], None] | None = None) -> PipelineConfig:
    """`check_path(path, field)` sees every path the pipeline names before anything but resolve_path's
    lookup touches it: a server raises there for paths outside its workspace, which stay unopened."""
    file = Path(path)
    name = str(file)
    doc = load_yaml(file)
    if not isinstance(doc, dict):
        validate(doc, "pipeline", name)  # reports the wrong top-level type
    doc = apply_overrides(doc, list(overrides), name)
    validate(doc, "pipeline", name)

    def existing(value: str, field_name: str) -> Path:
        p = resolve_path(value, file)
        if check_path:
            check_path(p, field_name)
        if not p.exists():
            raise InputError(name, field_name, f"file not found: {value}")
        if p.is_dir():
            raise InputError(name, field_name, f"is a directory, expected a file: {value}")
        return p

    constitution_path = existing(doc["constitution"], "constitution")
    prompt_values = doc["prompts"] if isinstance(doc["prompts"], list) else [doc["prompts"]]
    prompt_field = (lambda i: f"prompts[{i}]") if isinstance(doc["prompts"], list) else (lambda i: "prompts")
    prompt_paths = [existing(v, prompt_field(i)) for i, v in enumerate(prompt_values)]

    backends = {}
    for backend_name, b in doc["backends"].items():
        if b["type"] == "vllm" and b["model"] not in EMBEDDED and check_path:
            check_path(resolve_path(b["model"], file), f"backends.{backend_name}.model")
        backends[backend_name] = backend_spec(backend_name, b, file, f"backends.{backend_name}")
    roles = dict(doc["roles"])
    for role, backend_name in roles.items():
        if backend_name not in backends:
            raise InputError(name, f"roles.{role}", f"undeclared backend {backend_name!r} (declared: {', '.join(backends)})")

    stages: list[StageConfig] = []
    seen: dict[str, int] = {}
    for index, s in enumerate(doc["stages"]):
        stage_name = s.get("name", s["type"])
        if stage_name in seen:
            raise InputError(name, f"stages[{index}].name", f"duplicate stage name {stage_name!r} (give each stage a distinct name)")
        seen[stage_name] = index
        if s["type"] == "revision_check" and not any(earlier.type == "critique_revise" for earlier in stages):
            raise InputError(name, f"stages[{index}].type", "revision_check judges revisions: put it after a critique_revise stage")
        params = {k: v for k, v in s.items() if k not in ("type", "name")}
        if "calibration" in params and "jury" in params:
            raise InputError(name, f"stages[{index}].calibration", "a calibration is fitted to one judge: a jury's jurors would share it")
        if "calibration" in params:  # read here, like every file a pipeline names: a bad one stops the run before it starts
            params["calibration"] = calibration.load(existing(params["calibration"], f"stages[{index}].calibration"))
        for role in build(s["type"], params).roles:
            if role not in roles:
                where = f"stages[{index}].jury.{role}" if "jury" in params else "roles"
                raise InputError(name, where, f"stage {stage_name!r} needs the role {role!r}, which roles does not assign")
        stages.append(StageConfig(type=s["type"], name=stage_name, params=params))
    used = {role for s in stages for role in build(s.type, s.params).roles}
    for role in sorted(roles.keys() - STANDARD_ROLES - used):
        raise InputError(name, f"roles.{role}", "no stage uses this role (a compare stage's jury names the extra judge roles)")

    output = doc.get("output", {})
    config = PipelineConfig(
        file=file,
        raw=doc,
        name=doc["name"],
        seed=doc["seed"],
        constitution_path=constitution_path,
        prompt_paths=prompt_paths,
        backends=backends,
        roles=roles,
        stages=stages,
        rows_in_flight=doc.get("rows_in_flight", DEFAULT_ROWS_IN_FLIGHT),
        output_dir=Path(output["dir"]).expanduser() if "dir" in output else None,  # relative to where cai runs
    )
    config.constitution = constitution_mod.load(constitution_path)
    for index, stage in enumerate(stages):
        if stage.type in ("compare", "score") and not any(p.comparison for p in config.constitution.principles):
            raise InputError(str(constitution_path), "principles", f"stage {stage.name!r} judges answers, but no principle has a 'comparison' question")
        shots, available = stage.params.get("few_shot", 0), len(config.constitution.comparison_few_shot)
        if stage.type == "compare" and shots > available:
            raise InputError(
                name, f"stages[{index}].few_shot", f"{shots} comparison few-shots asked, the constitution {doc['constitution']} has {available} (its comparison_few_shot)"
            )
    return config

