"""The server's SQLite file (DIR/.cai/jobs.sqlite): the job queue and the labeling tasks share it. A
connection per call: sqlite3 connections are not shared between threads, and opening one costs
microseconds next to what a request does."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path


def connect(path: Path) -> closing[sqlite3.Connection]:
    """Autocommit (a statement is its own transaction unless a BEGIN opens one), and every commit
    synced: what the server acknowledged survives kill -9 and power loss. Closed when the block ends."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=FULL")
    return closing(db)


def create(path: Path, schema: str) -> None:
    """The file in WAL mode (readers never wait for a writer) with `schema`'s tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)
