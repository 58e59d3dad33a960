"""The workspace a server works over: every file a job names, and every file the job's config names in
turn, must lie inside it, and is checked before it is opened. A path that escapes (`..`, an absolute
path, a symlink out) is an InputError, which the API returns as 400 with the CLI's one-line message.
A job's backends and engine options must also pass the server's policy (cai/service/policy.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cai.core.errors import InputError
from cai.core.files import load_yaml, resolve_path, schema
from cai.core.models import EMBEDDED
from cai.generate import config as pipeline_config
from cai.generate.backends.base import BackendSpec
from cai.generate.config import PipelineConfig
from cai.rating import config as eval_config
from cai.rating.config import EvalConfig, RatedModel
from cai.service.policy import API_BACKENDS, ServerBackend, check_api_backend, check_engine_options
from cai.train import config as train_config
from cai.train.config import TrainConfig

# Where the server keeps its own state; never offered as a pipeline or an eval, never a job's output.
STATE_DIR = ".cai"
_NOT_SCANNED = {STATE_DIR, "runs", "node_modules"}


@dataclass(frozen=True)
class Workspace:
    root: Path  # resolved
    backends: Mapping[str, ServerBackend] = field(default_factory=dict)  # the API servers jobs may use

    @classmethod
    def open(cls, folder: str | Path, backends: Mapping[str, ServerBackend] | None = None) -> "Workspace":
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise InputError(str(folder), None, "workspace folder not found")
        return cls(root, backends or {})

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    def resolve(self, relative: str, what: str) -> Path:
        """A path given through the API: relative to the workspace, no `..`, not leaving it by a symlink."""
        if not relative or "\x00" in relative:
            raise InputError(relative, what, "empty or invalid path")
        parts = PurePosixPath(relative.replace("\\", "/"))
        if parts.is_absolute() or Path(relative).is_absolute():
            raise InputError(relative, what, "absolute paths are refused: give a path relative to the workspace")
        if ".." in parts.parts:
            raise InputError(relative, what, "'..' is refused: give a path inside the workspace")
        return self.inside(self.root / relative, relative, what)

    def inside(self, path: Path, shown: str, what: str) -> Path:
        """`path` with symlinks resolved, or an InputError when that leaves the workspace."""
        real = path.resolve()
        if real != self.root and not real.is_relative_to(self.root):
            raise InputError(shown, what, "leaves the workspace (through a symlink or an absolute path): refused")
        if real.is_relative_to(self.state_dir):
            raise InputError(shown, what, f"{STATE_DIR}/ holds the server's own state: refused")
        return real

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def load_pipeline(self, relative: str, overrides: list[str]) -> PipelineConfig:
        """Load and validate as `cai run` does, each file the pipeline names checked to be in here before
        it is read; then its backends against the server's policy."""
        path = self.resolve(relative, "pipeline")
        shown = relative
        # Relative to the workspace, the server's current folder (cai serve makes it so): errors then
        # name the file as `cai run` in the workspace would.
        cfg = pipeline_config.load(
            path.relative_to(self.root), overrides, check_path=lambda p, what: self.inside(p, shown, what)
        )
        for name, spec in cfg.backends.items():
            self._check_backend(spec, path, shown, f"backends.{name}")
        if cfg.output_dir is not None:
            self.inside(self.root / cfg.output_dir, shown, "output.dir")
        return cfg

    def load_eval(self, relative: str, overrides: list[str]) -> EvalConfig:
        """Load and validate as `cai eval` does, each file the eval names checked to be in here before it
        is read; then the backends it uses (its judges' and its models') against the server's policy."""
        path = self.resolve(relative, "eval")
        shown = relative
        cfg = eval_config.load(
            path.relative_to(self.root), overrides, check_path=lambda p, what: self.inside(p, shown, what)
        )
        for spec in cfg.judges.values():
            self._check_backend(spec, path, shown, f"backends.{spec.name}")
        for model in cfg.models.values():
            self._check_backend(model.backend, path, shown, f"backends.{model.backend.name}", _model_field(cfg, model))
        if cfg.output_dir is not None:
            self.inside(self.root / cfg.output_dir, shown, "output.dir")
        return cfg

    def run_dir(self, requested: str | None, default: Path, shown: str) -> Path:
        """The run directory a job asked for, else its command's `default` (relative to the workspace,
        where jobs run)."""
        if requested:
            return self.resolve(requested, "run_dir")
        return self.inside(self.root / default, shown, "output.dir")

    def load_training(self, kind: str, relative: str, overrides: list[str]) -> TrainConfig:
        path = self.resolve(relative, "config")
        cfg = train_config.load(kind, path.relative_to(self.root), overrides)
        self._check_model(cfg.model, path, relative, "model")
        if cfg.dpo.reference is not None:
            self._check_model(cfg.dpo.reference, path, relative, "dpo.reference")
        if cfg.distill.teacher is not None:
            self._check_model(cfg.distill.teacher, path, relative, "distill.teacher")
        check_engine_options(cfg.distill.vllm_options, relative, "distill.vllm_options")
        check_engine_options(cfg.online_dpo.vllm_options, relative, "online-dpo.vllm_options")
        for where, read in cfg.read_paths():
            self.inside(read, relative, where)
        for section, options in cfg.reward_sections().items():
            check_engine_options(options.vllm_options, relative, f"{section}.vllm_options")
        for judge, judge_spec in cfg.judges():
            self._check_backend(judge_spec.backend, path, relative, f"{judge}.backend")
        self.inside(self.root / cfg.output_dir, relative, "output_dir")
        return cfg

    def _check_backend(
        self, spec: BackendSpec, config_file: Path, shown: str, where: str, model_field: str | None = None
    ) -> None:
        """A backend a job may start: an API the operator declared, or an engine with allowed options on a
        model of the workspace. `where`: the backend's field; `model_field`: its model's (default `where.model`)."""
        model_field = model_field or f"{where}.model"
        if spec.type in API_BACKENDS:
            check_api_backend(spec, self.backends, shown, where, model_field)
        else:
            self._check_model(spec.model, config_file, shown, model_field)
            check_engine_options(spec.options, shown, f"{where}.options")

    def _check_model(self, model: str, config_file: Path, shown: str, what: str) -> None:
        """An embedded model or a model folder in here. Not a hub id: that would have the server download
        whatever a job names, weights and tokenizer files no operator looked at."""
        if model in EMBEDDED:
            return
        if not self.inside(resolve_path(model, config_file), shown, what).is_dir():
            raise InputError(
                shown,
                what,
                f"{model}: not a model folder in the workspace (jobs use embedded models or folders in the workspace, not hub ids)",
            )

    def pipelines(self) -> list[dict]:
        """Pipeline files in the workspace, for the dashboard's form."""
        return [
            {
                "path": relative,
                "name": doc.get("name"),
                "stages": [s.get("name", s.get("type")) for s in doc.get("stages") or [] if isinstance(s, dict)],
            }
            for relative, doc in self._documents("pipeline")
        ]

    def evals(self) -> list[dict]:
        """Eval files in the workspace, for the dashboard's form."""
        return [
            {
                "path": relative,
                "name": doc.get("name"),
                "models": _names(doc.get("models")),
                "axes": _names(doc.get("axes")),
            }
            for relative, doc in self._documents("eval")
        ]

    def trainings(self) -> list[dict]:
        """Train configs in the workspace, for the dashboard's form (one config may serve several kinds)."""
        return [
            {"path": relative, "model": doc.get("model"), "output_dir": doc.get("output_dir")}
            for relative, doc in self._documents("train")
        ]

    def _documents(self, kind: str) -> Iterator[tuple[str, dict]]:
        """(path, content) of the YAML files in here with the required keys of `kind`'s schema."""
        required = set(schema(kind)["required"])
        for path in self._yaml_files():
            relative = path.relative_to(self.root)
            try:
                self.inside(path, str(relative), kind)
                doc = load_yaml(path)
            except InputError:
                continue
            if isinstance(doc, dict) and required <= set(doc):
                yield relative.as_posix(), doc

    def _yaml_files(self) -> list[Path]:
        """YAML files, not descending into run directories (their call caches can be large) or hidden folders."""
        out = []
        for folder, dirs, files in os.walk(self.root):
            top = Path(folder) == self.root
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in _NOT_SCANNED))
            out += [Path(folder) / f for f in sorted(files) if f.endswith((".yaml", ".yml"))]
        return out


def _model_field(cfg: EvalConfig, model: RatedModel) -> str | None:
    """Where the eval names a rated model: its entry's `model` or `checkpoints`; None: its backend's model."""
    entry = cfg.raw["models"][model.series]
    return next((f"models.{model.series}.{key}" for key in ("model", "checkpoints") if key in entry), None)


def _names(value: object) -> list[str]:
    return list(value) if isinstance(value, dict) else []
