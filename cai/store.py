"""The run directory: manifest, append-only stage shards, the call cache and the failure log.

Every file here is only ever appended to, one complete JSON line per record, flushed and fsynced per
batch. A process killed mid-write leaves at most one torn last line, which readers skip; each process
writes its own new shard, so no torn line is ever appended to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.files import canonical_json


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete records of a JSONL file. A line torn by a killed writer is skipped: it has no newline,
    or (in a log appended to again after the kill) it no longer parses."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def replaced_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `folder` to fill; on success it replaces `folder` whole, on any
    failure it is removed and `folder` stays as it was: readers never see a half-written folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield tmp
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Appends records to a shard of its own; the file is created on the first write only."""

    def __init__(self, folder: Path, prefix: str = "part"):
        self.folder = folder
        self.prefix = prefix
        self._file = None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(canonical_json(r) + "\n" for r in records)
        if not text:
            return
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in self.folder.glob(f"{self.prefix}-*.jsonl")}
            index = 0
            while f"{self.prefix}-{index:05d}.jsonl" in taken:
                index += 1
            self._file = open(self.folder / f"{self.prefix}-{index:05d}.jsonl", "x", encoding="utf-8")
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_shards(folder: Path, prefix: str = "part") -> Iterator[dict[str, Any]]:
    if folder.is_dir():
        for path in sorted(folder.glob(f"{prefix}-*.jsonl")):
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

    def stage_rows(self, stage: str) -> dict[str, dict[str, Any]]:
        """Rows a stage has finished, by id (the first record of an id wins; there is never a second)."""
        rows: dict[str, dict[str, Any]] = {}
        for row in read_shards(self.root / stage):
            rows.setdefault(row["id"], row)
        return rows

    def stage_writer(self, stage: str) -> ShardWriter:
        return ShardWriter(self.root / stage)

    def cached_calls(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r["completion"] for r in read_shards(self.calls_dir)}

    def call_writer(self) -> ShardWriter:
        return ShardWriter(self.calls_dir)

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
