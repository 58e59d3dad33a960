"""Pipeline files: load, apply `--set` overrides, validate (including the files they name), resolve.
Prompt files are checked to exist here and read lazily by the run."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cai.core.errors import InputError
from cai.core.files import existing_path, load_yaml, resolve_path, validate
from cai.core.models import EMBEDDED, check_model_folder
from cai.core.overrides import apply_overrides
from cai.generate import calibration
from cai.generate import constitution as constitution_mod
from cai.generate import prompts as prompts_mod
from cai.generate.backends.base import BackendSpec
from cai.generate.constitution import Constitution
from cai.generate.prompts import Prompt
from cai.generate.stages import build

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
    constitution: Constitution = field(repr=False)

    def prompts(self, limit: int | None = None) -> Iterator[Prompt]:
        """The prompts in input order, read and validated lazily (a bad line raises when reached)."""
        return itertools.islice(prompts_mod.iter_many(self.prompt_paths), limit)


def backend_spec(backend_name: str, b: dict[str, Any], file: Path, field_name: str) -> BackendSpec:
    """A backend entry (schema `$defs/backend`) as a BackendSpec; a local model folder must exist."""
    model = b["model"]
    local = b["type"] == "vllm"
    if local:  # an API backend's model is a name the server knows, never a path here
        check_model_folder(model, file, str(file), f"{field_name}.model")
    settings = {k: v for k, v in b.items() if k not in ("type", "model", "options")}
    if "prices" in settings:
        settings["prices"] = charged_prices(settings["prices"], batch=b["type"] == "openai_batch")
    return BackendSpec(
        name=backend_name,
        type=b["type"],
        model=model,
        options=dict(b.get("options", {})),
        settings=settings,
        base_dirs=(str(file.parent.resolve()), str(Path.cwd())),
    )


def charged_prices(prices: dict[str, float], batch: bool) -> dict[str, float]:
    """The per-million prices a backend's tokens cost: a Batch API backend's are the declared batch
    prices when the pipeline gives them (one `prices` entry serves an online and a batch backend)."""
    if batch and "batch_input_per_million" in prices:
        return {
            "input_per_million": prices["batch_input_per_million"],
            "output_per_million": prices["batch_output_per_million"],
        }
    return {"input_per_million": prices["input_per_million"], "output_per_million": prices["output_per_million"]}


def load(
    path: str | Path, overrides: list[str] = (), check_path: Callable[[Path, str], None] | None = None
) -> PipelineConfig:
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
        if check_path:  # before the existence check: a confined service says "outside" without probing
            check_path(resolve_path(value, file), field_name)
        return existing_path(value, file, name, field_name)

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
            raise InputError(
                name, f"roles.{role}", f"undeclared backend {backend_name!r} (declared: {', '.join(backends)})"
            )

    stages: list[StageConfig] = []
    seen: dict[str, int] = {}
    for index, s in enumerate(doc["stages"]):
        stage_name = s.get("name", s["type"])
        if stage_name in seen:
            raise InputError(
                name, f"stages[{index}].name", f"duplicate stage name {stage_name!r} (give each stage a distinct name)"
            )
        seen[stage_name] = index
        if s["type"] == "revision_check" and not any(earlier.type == "critique_revise" for earlier in stages):
            raise InputError(
                name, f"stages[{index}].type", "revision_check judges revisions: put it after a critique_revise stage"
            )
        params = {k: v for k, v in s.items() if k not in ("type", "name")}
        if "calibration" in params and "jury" in params:
            raise InputError(
                name,
                f"stages[{index}].calibration",
                "a calibration is fitted to one judge: a jury's jurors would share it",
            )
        # read here, like every file a pipeline names: a bad one stops the run before it starts
        if "calibration" in params:
            params["calibration"] = calibration.load(existing(params["calibration"], f"stages[{index}].calibration"))
        for role in build(s["type"], params).roles:
            if role not in roles:
                where = f"stages[{index}].jury.{role}" if "jury" in params else "roles"
                raise InputError(
                    name, where, f"stage {stage_name!r} needs the role {role!r}, which roles does not assign"
                )
        stages.append(StageConfig(type=s["type"], name=stage_name, params=params))
    used = {role for s in stages for role in build(s.type, s.params).roles}
    for role in sorted(roles.keys() - STANDARD_ROLES - used):
        raise InputError(
            name, f"roles.{role}", "no stage uses this role (a compare stage's jury names the extra judge roles)"
        )

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
        constitution=constitution_mod.load(constitution_path),
    )
    for index, stage in enumerate(stages):
        if stage.type in ("compare", "score") and not any(p.comparison for p in config.constitution.principles):
            raise InputError(
                str(constitution_path),
                "principles",
                f"stage {stage.name!r} judges answers, but no principle has a 'comparison' question",
            )
        shots, available = stage.params.get("few_shot", 0), len(config.constitution.comparison_few_shot)
        if stage.type == "compare" and shots > available:
            raise InputError(
                name,
                f"stages[{index}].few_shot",
                f"{shots} comparison few-shots asked, the constitution {doc['constitution']} has {available} (its comparison_few_shot)",
            )
    return config
