"""Eval files (`cai eval EVAL.yaml`): load, apply `--set` overrides, validate against cai/schemas/eval.json
and resolve: the models rated (checkpoint globs expanded in step order), the judge (the compare stage's,
in both orders always), the axes and their questions. Every error names the file and the field."""

from __future__ import annotations

import functools
import glob
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from cai.core.errors import InputError
from cai.core.files import content_hash, existing_path, load_yaml, resolve_path, validate
from cai.core.models import EMBEDDED, check_model_folder
from cai.core.overrides import apply_overrides
from cai.generate import calibration
from cai.generate import constitution as constitution_mod
from cai.generate import prompts as prompts_mod
from cai.generate.backends.base import BackendSpec
from cai.generate.config import DEFAULT_ROWS_IN_FLIGHT, backend_spec
from cai.generate.constitution import Constitution, Principle
from cai.generate.prompts import Prompt
from cai.generate.stages.compare import Compare

BOOTSTRAP_ROUNDS = 1000
JUDGE_ROLE = "judge"  # the one judge's role in the compare stage; a jury's roles are its backends' names


@dataclass(frozen=True)
class Generation:
    """How a model answers the eval's prompts."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    system_prompt: str | None = None


@dataclass(frozen=True)
class RatedModel:
    name: str  # as rated: the entry's name, or NAME@FOLDER for each checkpoint of a glob
    backend: BackendSpec  # the entry's backend, its model replaced by the entry's own
    generation: Generation
    series: str  # the entry's name: a glob's checkpoints share it and are joined by a line in the plots
    step: int | None = None  # a checkpoint's step (the number ending its folder's name)
    engine: dict[str, Any] = field(default_factory=dict)  # engine_identity(backend)

    @functools.cached_property
    def identity(self) -> str:
        """What determines this model's answers (its name does not: renaming a model reuses them)."""
        return content_hash({"engine": self.engine, "generation": asdict(self.generation)})


@dataclass(frozen=True)
class Axis:
    name: str
    prompt_paths: tuple[Path, ...]
    constitution: Constitution  # what the judge asks: the eval's, or one principle holding the axis' question
    question: str | None = None

    def prompts(self, limit: int | None = None) -> Iterator[Prompt]:
        for count, prompt in enumerate(prompts_mod.iter_many(self.prompt_paths)):
            if limit is not None and count >= limit:
                return
            yield prompt


@dataclass
class EvalConfig:
    file: Path
    raw: dict[str, Any]  # the validated document, overrides applied: recorded in the manifest
    name: str
    seed: int
    constitution_path: Path
    models: dict[str, RatedModel]  # in the file's order, a glob's checkpoints in step order
    baseline: str
    judge: Compare
    judges: dict[str, BackendSpec]  # the compare stage's roles -> their backends
    judge_engines: dict[str, dict[str, Any]]  # the compare stage's roles -> engine_identity of their backends
    axes: dict[str, Axis]
    comparisons: str
    pairs_per_prompt: int | None
    bootstrap: int
    rows_in_flight: int
    output_dir: Path | None
    constitution: Constitution = field(repr=False)

    def used_backends(self) -> list[BackendSpec]:
        """The backends the eval starts: its judges' and its models' (a declared one nobody uses never starts)."""
        return [*self.judges.values(), *(m.backend for m in self.models.values())]

    def judge_identity(self) -> dict[str, Any]:
        """What makes two judgments the same: the judge's settings and the engines behind its roles."""
        settings = {k: v for k, v in self.raw["judge"].items() if k not in ("backend", "calibration")}
        cal = self.judge.calibration
        return {
            "settings": settings,
            "engines": self.judge_engines,
            **({"calibration": cal.sha256} if cal else {}),
        }


def load(
    path: str | Path, overrides: list[str] = (), check_path: Callable[[Path, str], None] | None = None
) -> EvalConfig:
    """`check_path(path, field)` sees every path the file names before it is opened (the server's
    workspace confinement), as pipeline files do."""
    file = Path(path)
    name = str(file)
    doc = load_yaml(file)
    if not isinstance(doc, dict):
        validate(doc, "eval", name)
    doc = apply_overrides(doc, list(overrides), name)
    validate(doc, "eval", name)

    def existing(value: str, field_name: str) -> Path:
        if check_path:
            check_path(resolve_path(value, file), field_name)
        return existing_path(value, file, name, field_name)

    constitution_path = existing(doc["constitution"], "constitution")
    constitution = constitution_mod.load(constitution_path)
    backends = {}
    for backend_name, b in doc["backends"].items():
        if b["type"] == "vllm" and b["model"] not in EMBEDDED and check_path:
            check_path(resolve_path(b["model"], file), f"backends.{backend_name}.model")
        backends[backend_name] = backend_spec(backend_name, b, file, f"backends.{backend_name}")

    def backend(backend_name: str, where: str) -> BackendSpec:
        if backend_name not in backends:
            raise InputError(name, where, f"undeclared backend {backend_name!r} (declared: {', '.join(backends)})")
        return backends[backend_name]

    defaults = Generation(**doc.get("generation", {}))
    models: dict[str, RatedModel] = {}
    for entry, spec in doc["models"].items():
        where = f"models.{entry}"
        if "model" in spec and "checkpoints" in spec:
            raise InputError(name, where, "give `model` or `checkpoints`, not both")
        base = backend(spec["backend"], f"{where}.backend")
        generation = replace(defaults, **{k: spec[k] for k in asdict(defaults) if k in spec})
        local = base.type == "vllm"
        if "checkpoints" in spec:
            if not local:
                raise InputError(name, f"{where}.checkpoints", "checkpoints are model folders: use a vllm backend")
            folders = _checkpoints(spec["checkpoints"], file, name, f"{where}.checkpoints", check_path)
            for step, folder_name, folder in folders:
                rated = _rated(f"{entry}@{folder_name}", base, str(folder), generation, entry, step)
                models[rated.name] = rated
            continue
        model = spec.get("model", base.model)
        if local and "model" in spec:
            if model not in EMBEDDED and check_path:
                check_path(resolve_path(model, file), f"{where}.model")
            check_model_folder(model, file, name, f"{where}.model")
            if resolve_path(model, file).is_dir():
                model = str(resolve_path(model, file).resolve())
        models[entry] = _rated(entry, base, model, generation, entry, None)
    if doc["baseline"] not in models:
        raise InputError(
            name, "baseline", f"{doc['baseline']!r} is not a model of this eval (models: {', '.join(models)})"
        )
    if len(models) < 2:
        raise InputError(name, "models", "rating needs at least two models: the baseline and one to compare with it")

    judge_doc = doc["judge"]
    if ("backend" in judge_doc) == ("jury" in judge_doc):
        given = "not both" if "backend" in judge_doc else "one of them is required"
        raise InputError(name, "judge", f"name the judge's `backend`, or a `jury` of backends: {given}")
    params = {k: v for k, v in judge_doc.items() if k != "backend"}
    if "calibration" in params:
        if "jury" in params:
            raise InputError(
                name, "judge.calibration", "a calibration is fitted to one judge: a jury's jurors would share it"
            )
        params["calibration"] = calibration.load(existing(params["calibration"], "judge.calibration"))
    judge = Compare(**params, swap=True)
    if judge.jury:
        judges = {role: backend(role, f"judge.jury.{role}") for role in judge.jury}
    else:
        judges = {JUDGE_ROLE: backend(judge_doc["backend"], "judge.backend")}

    axes = {}
    for axis_name, spec in doc["axes"].items():
        where = f"axes.{axis_name}"
        values = spec["prompts"] if isinstance(spec["prompts"], list) else [spec["prompts"]]
        field_of = (
            (lambda i: f"{where}.prompts[{i}]") if isinstance(spec["prompts"], list) else (lambda i: f"{where}.prompts")
        )
        paths = tuple(existing(v, field_of(i)) for i, v in enumerate(values))
        question = spec.get("question")
        if question is None:
            if not any(p.comparison for p in constitution.principles):
                raise InputError(
                    name,
                    where,
                    f"no question, and no principle of {doc['constitution']} has a 'comparison' question: "
                    "give the axis a question",
                )
            asked = constitution
        else:
            asked = replace(constitution, principles=(Principle(axis_name, "", "", comparison=question),))
        shots = judge.few_shot
        if shots > len(asked.comparison_few_shot):
            raise InputError(
                name,
                "judge.few_shot",
                f"{shots} comparison few-shots asked, the constitution has {len(asked.comparison_few_shot)}",
            )
        if next(prompts_mod.iter_many(paths), None) is None:  # reads the first line: a broken one stops here
            raise InputError(name, f"{where}.prompts", "no prompts")
        axes[axis_name] = Axis(axis_name, paths, asked, question)

    output = doc.get("output", {})
    return EvalConfig(
        file=file,
        raw=doc,
        name=doc["name"],
        seed=doc.get("seed", 0),
        constitution_path=constitution_path,
        models=models,
        baseline=doc["baseline"],
        judge=judge,
        judges=judges,
        judge_engines={role: engine_identity(spec) for role, spec in judges.items()},
        axes=axes,
        comparisons=doc.get("comparisons", "all_pairs"),
        pairs_per_prompt=doc.get("pairs_per_prompt"),
        bootstrap=doc.get("bootstrap", BOOTSTRAP_ROUNDS),
        rows_in_flight=doc.get("rows_in_flight", DEFAULT_ROWS_IN_FLIGHT),
        output_dir=Path(output["dir"]).expanduser() if "dir" in output else None,
        constitution=constitution,
    )


def _rated(
    name: str, base: BackendSpec, model: str, generation: Generation, series: str, step: int | None
) -> RatedModel:
    spec = replace(base, model=model)
    return RatedModel(name, spec, generation, series, step, engine_identity(spec))


def engine_identity(spec: BackendSpec) -> dict[str, Any]:
    """What makes two calls go to the same engine, the key of its calls in the cache: the backend's
    identity and, for a local model folder, its files by name, size and modification time (cheap, and
    changed by a retraining into the same folder)."""
    folder = (
        Path(spec.model)
        if Path(spec.model).is_absolute()
        else Path(spec.base_dirs[0] if spec.base_dirs else ".") / spec.model
    )
    if spec.type != "vllm" or not folder.is_dir():
        return spec.identity()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {**spec.identity(), "weights": content_hash(files)}


STEP = re.compile(r"(\d+)$")


def _fixed_depth(pattern: Path) -> int:
    """How many leading parts of a glob pattern hold no wildcard."""
    return next((k for k, part in enumerate(pattern.parts) if glob.has_magic(part)), len(pattern.parts))


def _checkpoints(
    pattern: str, file: Path, shown: str, where: str, check_path: Callable[[Path, str], None] | None
) -> list[tuple[int | None, str, Path]]:
    """The model folders a glob matches (relative to the eval file's folder, else the current one), in step
    order: the number ending each folder's name (`step-12`), then the name. Each is (step, name as matched,
    resolved folder): a symlinked checkpoint keeps its own name, not its target's."""
    bases = (
        [Path(pattern).expanduser()]
        if Path(pattern).expanduser().is_absolute()
        else [file.parent / pattern, Path.cwd() / pattern]
    )
    matches: list[Path] = []
    for candidate in bases:
        if check_path:  # the fixed folders above the pattern, before anything is listed
            check_path(Path(*candidate.parts[: _fixed_depth(candidate)]), where)
        matches = sorted(Path(p) for p in glob.glob(str(candidate)) if Path(p).is_dir())
        if matches:
            break
    if not matches:
        raise InputError(shown, where, f"{pattern!r} matches no folder")
    found = []
    for folder in matches:
        if check_path:
            check_path(folder, where)
        if not (folder / "config.json").is_file():
            raise InputError(shown, where, f"{folder} is not a model folder (no config.json)")
        number = STEP.search(folder.name)
        found.append((int(number.group(1)) if number else None, folder.name, folder.resolve()))
    return sorted(found, key=lambda f: (f[0] is None, f[0] or 0, f[1]))
