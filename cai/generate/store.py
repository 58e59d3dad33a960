"""The run directory: manifest, append-only stage shards, the call cache and the failure log.

Stage shards are only ever appended to, one complete JSON line per record, handed to the OS as each
record is finished (a killed process loses none of them) and fsynced in groups (a power cut loses at
most the last group). A process killed mid-write leaves at most one torn last line, which readers
skip; each process writes its own new shard, so no torn line is ever appended to. The call cache is
an SQLite index (looked up on disk, never loaded whole) written in group commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from cai.core.disk import read_jsonl, write_atomic
from cai.core.files import canonical_json
from cai.generate.records import Row


class Location(NamedTuple):
    """Where a record lies: its shard and the byte offset of its line."""

    shard: Path
    offset: int


SHARDS = "part-*.jsonl"  # a stage folder's shards: part-00000.jsonl, part-00001.jsonl, one per writer


class ShardWriter:
    """Appends records to a shard of its own; the file is created on the first write only. Each append
    reaches the OS at once; `sync` makes everything appended so far durable with one fsync."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file = None
        self._path: Path | None = None
        self._size = 0
        self._unsynced = False

    def append(self, records: Iterable[dict[str, Any]]) -> list[Location]:
        """Write the records; returns where each one lies."""
        lines = [canonical_json(r) + "\n" for r in records]
        if not lines:
            return []
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in self.folder.glob(SHARDS)}
            index = 0
            while f"part-{index:05d}.jsonl" in taken:
                index += 1
            self._path = self.folder / f"part-{index:05d}.jsonl"
            self._file = open(self._path, "xb")
        locations = []
        for line in lines:
            data = line.encode("utf-8")
            locations.append(Location(self._path, self._size))
            self._file.write(data)
            self._size += len(data)
        self._file.flush()
        self._unsynced = True
        return locations

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = False

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def index_shards(folder: Path) -> dict[str, Location]:
    """Where each id's record lies (the first record of an id wins; there is never a second)."""
    index: dict[str, Location] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob(SHARDS)):
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    try:
                        record_id = json.loads(line)["id"]
                    except (ValueError, KeyError, TypeError):
                        record_id = None  # a line torn by a killed writer and later ended by another
                    if record_id is not None and record_id not in index:
                        index[record_id] = Location(path, offset)
                offset += len(line)
    return index


class ShardReader:
    """Reads records back by location, keeping one open file per shard."""

    def __init__(self):
        self._files: dict[Path, Any] = {}

    def read(self, location: Location) -> Row:
        f = self._files.get(location.shard)
        if f is None:
            f = self._files[location.shard] = open(location.shard, "rb")
        f.seek(location.offset)
        return json.loads(f.readline())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class CallCache:
    """Every successful backend call of a run, by key, in SQLite: looked up on disk, so memory and start
    time do not grow with the run. New entries are visible at once and reach the file in group commits
    (WAL: a killed process loses at most the calls since the last commit, which are simply asked again)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        self._pending: dict[str, str] = {}

    def get(self, key: str) -> Any | None:
        text = self._pending.get(key)
        if text is None:
            found = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
            text = found[0] if found else None
        return None if text is None else json.loads(text)

    def put(self, key: str, value: Any) -> None:
        self._pending[key] = json.dumps(value, ensure_ascii=False)

    def commit(self) -> None:
        if not self._pending:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO calls VALUES (?, ?)", self._pending.items())
        self._pending.clear()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] + len(self._pending)

    def close(self) -> None:
        self.commit()
        self._db.close()


def read_shards(folder: Path) -> Iterator[dict[str, Any]]:
    """Every record of a stage folder, shard by shard (what a stage wrote, for reading a run by hand)."""
    if folder.is_dir():
        for path in sorted(folder.glob(SHARDS)):
            yield from read_jsonl(path)


class RunStore:
    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.calls_dir = root / "calls"
        self.failures_path = root / "failures.jsonl"
        self.datasets_dir = root / "datasets"

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    def stage_index(self, stage: str) -> dict[str, Location]:
        """Where each row a stage has finished lies, by id."""
        return index_shards(self.root / stage)

    def stage_writer(self, stage: str) -> ShardWriter:
        return ShardWriter(self.root / stage)

    def call_cache(self) -> CallCache:
        return CallCache(self.calls_dir / "calls.sqlite")

    def record_failures(self, failures: list[dict[str, Any]]) -> None:
        if not failures:
            return
        with open(self.failures_path, "a+", encoding="utf-8") as f:
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":  # a torn line from a killed run: end it so ours start clean
                    f.write("\n")
            f.write("".join(canonical_json(r) + "\n" for r in failures))
            f.flush()
            os.fsync(f.fileno())

    def failures(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.failures_path)) if self.failures_path.exists() else []
