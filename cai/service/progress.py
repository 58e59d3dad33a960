"""What a job has done so far, read from the files its process writes: the progress file `cai run` and
`cai eval` keep when $CAI_PROGRESS_FILE is set (cai/generate/progress.py), a training's metrics.jsonl, and
the run directory (an eval's ratings.json among it)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cai.core.disk import read_json_or_none, read_jsonl
from cai.rating.results import RATINGS
from cai.service.jobs import FINISHED, RUN_KINDS, Job


def job_files(state_dir: Path, job: Job) -> dict[str, Path]:
    folder = state_dir / "jobs" / str(job.id)
    return {"folder": folder, "log": folder / "log.txt", "progress": folder / "progress.json"}


def progress(state_dir: Path, root: Path, job: Job) -> dict[str, Any]:
    out = (
        _run_progress(job_files(state_dir, job)["progress"], job)
        if job.kind in RUN_KINDS
        else _train_progress(root / job.out_dir, job)
    )
    if job.status == FINISHED:
        out["fraction"] = 1.0
    return out


def _run_progress(path: Path, job: Job) -> dict[str, Any]:
    doc = read_json_or_none(path) or {"stage": None, "stages": {}}
    stages = doc["stages"]
    current = stages.get(doc["stage"], {})
    seconds = current.get("seconds") or 0
    fractions = [
        min(s["done"] / s["total"], 1.0) if s["total"] else 1.0 for name, s in stages.items() if name in job.stages
    ]
    return {
        "stage": doc["stage"],
        "stages": stages,
        "rows_done": current.get("done", 0),
        "rows_total": current.get("total"),
        # rates over this process's rows only: a resumed stage's earlier rows took no time now
        "rows_per_s": round(current.get("new", 0) / seconds, 3) if seconds else 0.0,
        "tokens_per_s": round(current.get("tokens", 0) / seconds, 1) if seconds else 0.0,
        "failures": sum(s.get("failed", 0) for s in stages.values()),
        "fraction": sum(fractions) / len(job.stages) if job.stages else 0.0,
    }


def _train_progress(output_dir: Path, job: Job) -> dict[str, Any]:
    metrics = output_dir / "metrics.jsonl"
    train = [r for r in read_jsonl(metrics) if r.get("split") == "train"] if metrics.exists() else []
    step = train[-1]["step"] if train else 0
    return {
        "step": step,
        "max_steps": job.max_steps,
        "loss": train[-1].get("loss") if train else None,
        "fraction": min(step / job.max_steps, 1.0) if job.max_steps else 0.0,
    }


def summary(root: Path, job: Job) -> dict[str, Any]:
    """What the job's output folder holds: a run's dataset rows, a run's or an eval's failures and report;
    whether a training has written its final model."""
    out_dir = root / job.out_dir
    if job.kind not in RUN_KINDS:
        return {"output_dir": job.out_dir, "final_model": (out_dir / "final").is_dir()}
    out: dict[str, Any] = {"run_dir": job.out_dir}
    if job.kind == "run":
        datasets = out_dir / "datasets"
        out["datasets"] = {
            name: _lines(datasets / f"{name}.jsonl")
            for name in ("rows", "sft", "preferences", "unpaired")
            if (datasets / f"{name}.jsonl").exists()
        }
    return {**out, "failures": _lines(out_dir / "failures.jsonl"), "report": (out_dir / "report.html").exists()}


def ratings(root: Path, job: Job) -> dict[str, Any] | None:
    """The ratings.json an eval job's last attempt wrote (cai/rating/results.py has its contract). None until
    it has: the file there before is an earlier job's, as it is once a later job on the run directory
    has replaced it."""
    path = root / job.out_dir / RATINGS
    try:
        written = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if job.started is None or not job.started <= written <= (job.ended or time.time()):
        return None
    return read_json_or_none(path)


def _lines(path: Path) -> int:
    return sum(1 for _ in read_jsonl(path)) if path.exists() else 0


def downloads(root: Path, job: Job) -> list[str]:
    """The files worth offering, relative to the job's output folder. Every file in it can be fetched;
    the call cache, stage shards and checkpoints are left out of the list only for brevity."""
    out_dir = root / job.out_dir
    skip = {"calls", "checkpoints", "tensorboard", *job.stages}
    found = []
    # os.walk, not rglob: a running job swaps folders in and out (datasets/ is replaced whole), and a
    # folder that vanishes mid-walk is skipped instead of failing the request
    for folder, dirs, files in os.walk(out_dir):
        here = Path(folder).relative_to(out_dir)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (here == Path(".") and d in skip)]
        found += [(here / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)
