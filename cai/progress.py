"""A progress bar per stage: rows done of total, rows/s, generated tokens/s, failures.

With $CAI_PROGRESS_FILE set (by `cai serve` for its jobs), the same figures also go to that JSON file,
one entry per stage, rewritten atomically after each batch: the server streams from it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cai.store import write_atomic

PROGRESS_FILE_ENV = "CAI_PROGRESS_FILE"


class StageProgress:
    def __init__(self, name: str, total: int, done: int, enabled: bool = True):
        self.name = name
        self.enabled = enabled
        self.failed = 0
        self.tokens = 0
        self.rows = 0
        self.started = time.monotonic()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            disable=not enabled,
        )
        self._task = self._progress.add_task(name, total=total, completed=done, rate=self._rate())
        self.total = total
        self.done = done
        self._progress_file = os.environ.get(PROGRESS_FILE_ENV)

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.rows / elapsed:.2f} rows/s, {self.tokens / elapsed:.1f} tok/s{failed}"

    def advance(self, rows: int, failed: int, tokens: int) -> None:
        self.rows += rows
        self.failed += failed
        self.tokens += tokens
        self.done += rows
        self._progress.update(self._task, advance=rows, rate=self._rate())
        self._publish()

    def _publish(self) -> None:
        if not self._progress_file:
            return
        path = Path(self._progress_file)
        try:
            stages = json.loads(path.read_text(encoding="utf-8"))["stages"]
        except (OSError, ValueError, KeyError):
            stages = {}
        elapsed = time.monotonic() - self.started
        stages[self.name] = {
            "total": self.total, "done": self.done, "new": self.rows, "failed": self.failed, "tokens": self.tokens, "seconds": round(elapsed, 3)
        }  # fmt: skip
        write_atomic(path, json.dumps({"stage": self.name, "stages": stages}) + "\n")

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        self._publish()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.update(self._task, rate=self._rate())
        self._progress.stop()
        self._publish()
