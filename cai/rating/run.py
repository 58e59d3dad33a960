"""Run (or resume) an eval: every model answers every prompt of every axis, the judge compares the answers
of model pairs on each prompt, and the ratings are computed from the comparisons.

Both kinds of work are units with stable ids, appended to the run directory as each finishes (as a
pipeline's rows are) and skipped when a rerun finds them: an answer is keyed by the prompt, the model's
identity (engine, weights, sampling) and the seed; a judgment by the axis' question, the prompt, the two
answers and the judge's identity. A rerun after adding a model makes only its answers and the judgments
it takes part in; a rerun with another judge reuses every answer. Every engine call goes through the
run's call cache, so a killed run loses at most the calls in flight.

Answers stream through each engine at once (continuous batching, an API's concurrency); local engines
take the machine one at a time (two vLLM engines on one GPU do not fit at their default memory share),
and the judge's engine stays up from its own model's answers to the judgments.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from cai.core.files import content_hash
from cai.generate.backends import base as backends
from cai.generate.backends.base import BackendCallError, BackendSpec
from cai.generate.backends.cached import CachedBackend
from cai.generate.pipeline import COMMIT_EVERY_S, engine_output, versions
from cai.generate.progress import RunProgress, StageFigures
from cai.generate.prompts import Prompt
from cai.generate.stages import RowFailed, StageContext
from cai.generate.stages.respond import Respond
from cai.generate.store import Location, RunStore, ShardReader, ShardWriter
from cai.rating import report, results
from cai.rating.config import EvalConfig, RatedModel
from cai.rating.units import Judgment, answer_id, plan

ANSWERS, JUDGMENTS = "answers", "judgments"  # the run folder's two stage folders


@dataclass
class Work:
    name: str
    total: int = 0
    done: int = 0  # this invocation and earlier ones
    new: int = 0
    failed: int = 0
    calls: int = 0  # engine calls (judge votes, or answers) this invocation made or replayed


@dataclass
class EvalSummary:
    run_dir: Path
    answers: Work = field(default_factory=lambda: Work(ANSWERS))
    judgments: Work = field(default_factory=lambda: Work(JUDGMENTS))
    failed_ids: set[str] = field(default_factory=set)
    seconds: float = 0.0
    tokens: int = 0
    cached_calls: int = 0
    ratings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed_ids


def default_run_dir(config: EvalConfig) -> Path:
    return config.output_dir or Path("runs") / config.name


class Engines:
    """One call-cached backend per engine (models on the same engine share it, and the judge shares a
    model's); an engine is started on its first uncached call and closed once nothing needs it."""

    def __init__(self, cache, on_start: Callable[[], None]):
        self._cache = cache
        self._on_start = on_start
        self._by_key: dict[str, CachedBackend] = {}
        self._closed: set[str] = set()  # keys of the engines closed

    def get(self, identity: dict[str, Any], spec: BackendSpec) -> CachedBackend:
        key = content_hash(identity)
        if key not in self._by_key:

            async def starter(spec=spec):
                backend = await backends.start(spec)
                self._on_start()
                return backend

            self._by_key[key] = CachedBackend(identity, starter, self._cache)
        return self._by_key[key]

    async def release(self, identity: dict[str, Any]) -> None:
        """Close an engine nothing will call again (its stats stay counted)."""
        await self._close(content_hash(identity))

    async def close_all(self) -> None:
        for key in list(self._by_key):
            await self._close(key)

    async def _close(self, key: str) -> None:
        if key in self._by_key and key not in self._closed:
            self._closed.add(key)
            await self._by_key[key].close()

    @property
    def all(self) -> list[CachedBackend]:
        return list(self._by_key.values())


class _Units:
    """Work of one kind: its shard writer, what earlier invocations finished, its progress figures."""

    def __init__(self, store: RunStore, index: dict[str, Location], work: Work, progress: RunProgress):
        self.index = index
        self.writer: ShardWriter = store.stage_writer(work.name)
        self.work = work
        self.progress = progress

    def finished(self, record: dict[str, Any], tokens: int) -> None:
        [location] = self.writer.append([record])
        self.index[record["id"]] = location
        self.work.new += 1
        self.work.done += 1
        self.progress.finished(self.work.name, tokens)


async def arun(
    config: EvalConfig,
    run_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    engine_log: bool = False,
) -> EvalSummary:
    """Run (or resume) an eval from inside an event loop; `engine_log`: engine and library output go to
    RUN_DIR/engine.log instead of the terminal (the CLI's default)."""
    started = time.monotonic()
    run_dir = run_dir or default_run_dir(config)
    prompts = {name: list(axis.prompts(limit)) for name, axis in config.axes.items()}
    store = RunStore(run_dir)
    _record_invocation(store, config, limit)
    with engine_output(run_dir, engine_log) as terminal:
        summary = await _execute(config, store, prompts, show_progress, terminal)
    summary.seconds = time.monotonic() - started
    _record_figures(store, summary)
    return summary


async def _execute(
    config: EvalConfig, store: RunStore, prompts: dict[str, list[Prompt]], show_progress: bool, terminal
) -> EvalSummary:
    summary = EvalSummary(store.root)
    answers_done, judged_done = store.stage_index(ANSWERS), store.stage_index(JUDGMENTS)
    unique_prompts = list({p.id: p for axis_prompts in prompts.values() for p in axis_prompts}.values())
    # Each answer once, however many model entries share it (same engine and sampling: same answers)
    wanted = {answer_id(config, p, m): (m, p) for m in config.models.values() for p in unique_prompts}
    judgments = plan(config, prompts)
    summary.answers.total, summary.judgments.total = len(wanted), len(judgments)
    summary.answers.done = sum(unit in answers_done for unit in wanted)
    summary.judgments.done = sum(j.id in judged_done for j in judgments)
    progress = RunProgress(
        [StageFigures(w.name, w.total, w.done) for w in (summary.answers, summary.judgments)],
        enabled=show_progress,
        stream=terminal,
    )
    cache = store.call_cache()
    engines = Engines(cache, progress.restart_clocks)
    judges = {role: engines.get(config.judge_engines[role], spec) for role, spec in config.judges.items()}
    answers = _Units(store, answers_done, summary.answers, progress)
    judged = _Units(store, judged_done, summary.judgments, progress)
    failures: list[dict[str, Any]] = []
    slots = asyncio.Semaphore(config.rows_in_flight)
    reader = ShardReader()

    def failed(work: Work, unit_id: str, reason: str, **context: Any) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        failures.append({"id": unit_id, "stage": work.name, "reason": reason, **context, "time": now})
        summary.failed_ids.add(unit_id)
        work.failed += 1
        progress.failed(work.name)

    async def bounded(job: Awaitable[None]) -> None:
        async with slots:
            await job

    async def answer(model: RatedModel, backend: CachedBackend, prompt: Prompt, unit: str) -> None:
        progress.started(ANSWERS)
        # The respond stage answers, seeded by (run seed, prompt id, "answers"): every model samples a
        # prompt under the same seed, so models that differ only in their limits answer alike.
        row = {"id": prompt.id, "messages": list(prompt.messages)}
        ctx = StageContext(config.seed, ANSWERS, config.constitution, {"responder": backend}, {"responder": model.name})
        try:
            processed = await Respond(**asdict(model.generation)).process(row, ctx)
        except RowFailed as exc:
            failed(summary.answers, unit, f"{model.name}: {exc}", model=model.name, prompt_id=prompt.id)
            return
        finally:
            summary.answers.calls += 1
        record = {
            "id": unit,
            "prompt_id": prompt.id,
            "model": model.name,
            "model_identity": model.identity,
            "answer": processed.row["response"],
            "finish_reason": processed.row["response_finish_reason"],
            "completion_tokens": processed.completion_tokens,
        }
        answers.finished(record, processed.completion_tokens)

    async def judge(j: Judgment) -> None:
        progress.started(JUDGMENTS)
        texts = [reader.read(answers.index[a])["answer"] for a in j.answers]
        record: dict[str, Any] = {
            "id": j.id,
            "axis": j.axis,
            "prompt_id": j.prompt.id,
            "models": list(j.models),
            "answers": list(j.answers),
        }
        tokens = 0
        if texts[0].strip() == texts[1].strip():  # the compare stage judges no equal answers: a tie by definition
            record.update(identical=True, p_first=0.5, label="tie", votes=[], position_consistent=None)
        else:
            # The row's id is the prompt's on this axis, so every pair of a prompt is judged under the same
            # drawn principles: the models are measured with one yardstick per prompt.
            row = {
                "id": content_hash({"axis": j.axis, "prompt": j.prompt.id}),
                "messages": list(j.prompt.messages),
                "response": texts[0],
                "responses": texts,
            }
            ctx = StageContext(
                config.seed,
                f"eval-{j.axis}",
                config.axes[j.axis].constitution,
                judges,
                {role: spec.model for role, spec in config.judges.items()},
            )
            try:
                processed = await config.judge.process(row, ctx)
            except (RowFailed, BackendCallError) as exc:
                failed(summary.judgments, j.id, str(exc), axis=j.axis, prompt_id=j.prompt.id, models=list(j.models))
                return
            [pair] = processed.row["pairs"]
            tokens = processed.completion_tokens
            summary.judgments.calls += len(pair["votes"])
            record.update({k: v for k, v in pair.items() if k != "answers"})
        judged.finished(record, tokens)

    groups: dict[str, list[RatedModel]] = {}
    for model in config.models.values():
        groups.setdefault(content_hash(model.engine), []).append(model)
    judge_keys = {content_hash(identity) for identity in config.judge_engines.values()}
    # The judge's own engine last, so that it stays up into the judgments.
    order = sorted(groups, key=lambda key: key in judge_keys)
    committer = asyncio.ensure_future(_committer(cache, [answers.writer, judged.writer]))
    try:
        with progress:
            for key in order:
                pending = [(unit, m, p) for unit, (m, p) in wanted.items() if content_hash(m.engine) == key]
                backend = engines.get(groups[key][0].engine, groups[key][0].backend)
                await _gather(
                    [bounded(answer(m, backend, p, unit)) for unit, m, p in pending if unit not in answers.index]
                )
                if key not in judge_keys:
                    await engines.release(groups[key][0].engine)
            ready = [j for j in judgments if j.id not in judged.index and all(a in answers.index for a in j.answers)]
            await _gather([bounded(judge(j)) for j in ready])
    finally:
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        cache.close()
        for writer in (answers.writer, judged.writer):
            writer.close()
        store.record_failures(failures)
        summary.tokens = sum(b.stats.completion_tokens for b in engines.all)
        summary.cached_calls = sum(b.stats.cached_calls for b in engines.all)
        await engines.close_all()
    summary.ratings, samples = results.rate(config, prompts, judgments, answers.index, judged.index, reader)
    reader.close()
    results.write(store.root, summary.ratings, samples)
    report.write(store.root)
    return summary


async def _gather(jobs: list[Awaitable[None]]) -> None:
    """Every job at once; the first error (a bug, or an engine that died) cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _committer(cache, writers: list[ShardWriter]) -> None:
    """Group commits: the call cache and both shards every COMMIT_EVERY_S (failures are written at the end)."""
    while True:
        await asyncio.sleep(COMMIT_EVERY_S)
        cache.commit()
        for writer in writers:
            writer.sync()


def _record_invocation(store: RunStore, config: EvalConfig, limit: int | None) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = store.read_manifest() or {
        "name": config.name,
        "kind": "eval",
        "eval_file": str(config.file.resolve()),
        "created": now,
        "invocations": [],
    }
    manifest.update(config=config.raw, seed=config.seed, versions=versions())
    manifest["invocations"].append({"started": now, "limit": limit, "argv": sys.argv[1:]})
    store.write_manifest(manifest)


def _record_figures(store: RunStore, summary: EvalSummary) -> None:
    manifest = store.read_manifest()
    manifest["invocations"][-1].update(
        seconds=round(summary.seconds, 3),
        failed=len(summary.failed_ids),
        tokens=summary.tokens,
        cached_calls=summary.cached_calls,
        **{
            w.name: {"done": w.done, "new": w.new, "failed": w.failed, "calls": w.calls}
            for w in (summary.answers, summary.judgments)
        },
    )
    store.write_manifest(manifest)


def run(
    config: EvalConfig,
    run_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    engine_log: bool = False,
) -> EvalSummary:
    return backends.run_blocking(arun(config, run_dir, limit, show_progress, engine_log))
