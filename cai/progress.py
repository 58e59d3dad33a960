"""A progress bar per stage: rows done of total, rows/s, generated tokens/s, failures."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.rows / elapsed:.2f} rows/s, {self.tokens / elapsed:.1f} tok/s{failed}"

    def advance(self, rows: int, failed: int, tokens: int) -> None:
        self.rows += rows
        self.failed += failed
        self.tokens += tokens
        self._progress.update(self._task, advance=rows, rate=self._rate())

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.update(self._task, rate=self._rate())
        self._progress.stop()
