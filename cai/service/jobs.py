"""The job queue and history: one SQLite file in the workspace (WAL mode), so a server killed with
kill -9 loses nothing that was acknowledged. Every state change is one conditional UPDATE (`... WHERE
status = 'queued'`), so two workers, or a cancel racing a start, can never both win."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cai.service import database

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "finished",
    "failed",
    "cancelled",
    "interrupted",
)
ENDED = (FINISHED, FAILED, CANCELLED, INTERRUPTED)
RESUMABLE = (FAILED, CANCELLED, INTERRUPTED)
# Kinds that run as `cai KIND FILE --run-dir DIR`: a run directory, and progress from the progress file
RUN_KINDS = ("run", "eval")
DEFAULT_MAX_QUEUED = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,              -- run, eval, or a trainer kind (cai.train.config.KINDS)
    target TEXT NOT NULL,            -- the pipeline, eval or train config, relative to the workspace
    overrides TEXT NOT NULL,         -- JSON list of --set values
    row_limit INTEGER,
    out_dir TEXT NOT NULL,           -- run directory or training output_dir, relative to the workspace
    stages TEXT NOT NULL,            -- JSON list of stage names (runs, evals), for the progress fraction
    max_steps INTEGER,               -- trainings with a step budget, for the progress fraction
    status TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,  -- processes started for this job, resumes included
    pid INTEGER,
    exit_code INTEGER,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL
)
"""


@dataclass
class Job:
    id: int
    kind: str
    target: str
    overrides: list[str]
    row_limit: int | None
    out_dir: str
    stages: list[str]
    max_steps: int | None
    status: str
    cancel_requested: bool
    attempts: int
    pid: int | None
    exit_code: int | None
    error: str | None
    created: float
    started: float | None
    ended: float | None

    def command(self) -> list[str]:
        """The `cai` arguments this job runs: the same command a user would type, so resuming a job is
        rerunning it, as with `cai run`, `cai eval` and `cai train`."""
        sets = [arg for value in self.overrides for arg in ("--set", value)]
        if self.kind in RUN_KINDS:
            limit = ["--limit", str(self.row_limit)] if self.row_limit else []
            return [self.kind, self.target, "--run-dir", self.out_dir, "--quiet", *limit, *sets]
        return ["train", self.kind, self.target, *sets]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["pid"]  # the server's business
        for key in ("created", "started", "ended"):
            out[key] = _iso(out[key])
        return out


@dataclass
class NewJob:
    kind: str
    target: str
    out_dir: str
    overrides: list[str] = field(default_factory=list)
    row_limit: int | None = None
    stages: list[str] = field(default_factory=list)
    max_steps: int | None = None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class QueueFull(Exception):
    """As many jobs wait as the server allows: a flood of submissions is refused, not queued forever."""

    def __init__(self, max_queued: int):
        super().__init__(
            f"{max_queued} jobs are queued already, the most this server takes: submit again when some have started"
        )


class JobStore:
    def __init__(self, path: Path, max_queued: int = DEFAULT_MAX_QUEUED):
        self.path = path
        self.max_queued = max_queued
        database.create(path, _SCHEMA)

    def _db(self):
        return database.connect(self.path)

    # Appended to a statement that queues a job: counting and queueing are then one transaction.
    _ROOM = f"(SELECT COUNT(*) FROM jobs WHERE status = '{QUEUED}') < ?"

    def add(self, job: NewJob) -> Job:
        with self._db() as db:
            cur = db.execute(
                f"INSERT INTO jobs (kind, target, overrides, row_limit, out_dir, stages, max_steps, status, created) SELECT ?,?,?,?,?,?,?,?,? WHERE {self._ROOM}",
                (
                    job.kind,
                    job.target,
                    json.dumps(job.overrides),
                    job.row_limit,
                    job.out_dir,
                    json.dumps(job.stages),
                    job.max_steps,
                    QUEUED,
                    time.time(),
                    self.max_queued,
                ),
            )
            if cur.rowcount == 0:
                raise QueueFull(self.max_queued)
            return self.get(cur.lastrowid)

    def get(self, job_id: int) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, status: str | None = None) -> list[Job]:
        with self._db() as db:
            if status is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (status,)).fetchall()
        return [_job(r) for r in rows]

    def _update(self, job_id: int, when: tuple[str, ...], **values: Any) -> bool:
        """Set `values` if the job's status is one of `when`; True when it was."""
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in when)
        with self._db() as db:
            cur = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})", (*values.values(), job_id, *when)
            )
            return cur.rowcount == 1

    def claim(self, job_id: int) -> bool:
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, started = ?, ended = NULL, exit_code = NULL, error = NULL, pid = NULL "
                "WHERE id = ? AND status = ?",
                (RUNNING, time.time(), job_id, QUEUED),
            )
            return cur.rowcount == 1

    def set_pid(self, job_id: int, pid: int) -> None:
        self._update(job_id, (RUNNING,), pid=pid)

    def end(self, job_id: int, status: str, exit_code: int | None, error: str | None) -> bool:
        return self._update(job_id, (RUNNING,), status=status, exit_code=exit_code, error=error, ended=time.time())

    def cancel(self, job_id: int) -> bool:
        """A queued job is cancelled at once; a running one is flagged for the worker to stop."""
        if self._update(job_id, (QUEUED,), status=CANCELLED, cancel_requested=1, ended=time.time()):
            return True
        return self._update(job_id, (RUNNING,), cancel_requested=1)

    def resume(self, job_id: int) -> bool:
        """Queue an ended job again; False when it is not resumable, QueueFull when the queue is."""
        marks = ", ".join("?" for _ in RESUMABLE)
        with self._db() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = ?, cancel_requested = 0, error = NULL, exit_code = NULL, ended = NULL WHERE id = ? AND status IN ({marks}) AND {self._ROOM}",
                (QUEUED, job_id, *RESUMABLE, self.max_queued),
            )
            if cur.rowcount == 1:
                return True
        job = self.get(job_id)
        if job is not None and job.status in RESUMABLE:
            raise QueueFull(self.max_queued)
        return False


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["overrides"] = json.loads(d["overrides"])
    d["stages"] = json.loads(d["stages"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)
