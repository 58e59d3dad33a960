"""Files a run writes and reads back: JSONL records that survive a killed writer, whole-file and
whole-folder replacement (a reader never sees half of either)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def read_json_or_none(path: Path) -> Any:
    """A JSON file another process may not have written yet (or is writing without write_atomic): None
    when it is missing or does not parse, for callers that fall back to recomputing or to a default."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class JsonlRecords:
    """A JSONL file's records, read again on every pass instead of held in memory: a run of any size
    can be summed up in a few passes."""

    def __init__(self, path: Path):
        self.path = path
        self._count: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return read_jsonl(self.path)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A whole file or nothing: the block writes to a temporary path beside `path` (same suffix, so
    writers that infer a format from it still do), renamed over `path` when the block ends, removed when
    it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write a whole text file or nothing, fsynced before it replaces the old one."""
    with written_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
