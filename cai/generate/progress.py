"""The live display of a run: per stage rows done of total, rows in flight, rows/s, generated tokens/s,
failures and ETA, all stages at once (rows move through them at the same time). A terminal gets a
live display; piped output (CI, `| tee`) gets a plain line per stage every few seconds.

With $CAI_PROGRESS_FILE set (by `cai serve` for its jobs), the same figures also go to that JSON file,
rewritten atomically at most twice a second: the server streams from it."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cai.core.disk import write_atomic

PROGRESS_FILE_ENV = "CAI_PROGRESS_FILE"
PUBLISH_EVERY_S = 0.5
PLAIN_EVERY_S = 10.0


@dataclass
class StageFigures:
    name: str
    total: int
    done: int  # finished rows, earlier invocations included
    new: int = 0  # finished by this invocation
    in_flight: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return self.new / elapsed, self.tokens / elapsed

    def describe(self) -> str:
        rows_per_s, tokens_per_s = self.rates()
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.in_flight} in flight, {rows_per_s:.2f} rows/s, {tokens_per_s:.1f} tok/s{failed}"


class RunProgress:
    def __init__(self, stages: list[StageFigures], enabled: bool = True, stream: TextIO | None = None):
        self.stages = {s.name: s for s in stages}
        self.enabled = enabled
        self._stream = stream or sys.stderr  # the terminal's stderr, also while a run's output goes to its log
        self._live = enabled and self._stream.isatty()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=self._stream),
            disable=not self._live,
        )
        self._tasks = {
            s.name: self._progress.add_task(s.name, total=s.total, completed=s.done, figures=s.describe())
            for s in stages
        }
        self._progress_file = os.environ.get(PROGRESS_FILE_ENV)
        self._published = 0.0
        self._printed = time.monotonic()

    def restart_clocks(self) -> None:
        """Rates count from now (an engine just started: its load time is not generation time)."""
        for s in self.stages.values():
            if not s.new:
                s.started = time.monotonic()

    def started(self, stage: str) -> None:
        self.stages[stage].in_flight += 1

    def finished(self, stage: str, tokens: int) -> None:
        s = self.stages[stage]
        s.in_flight -= 1
        s.new += 1
        s.done += 1
        s.tokens += tokens
        self._refresh(s)

    def failed(self, stage: str) -> None:
        s = self.stages[stage]
        s.in_flight -= 1
        s.failed += 1
        self._refresh(s)

    def _refresh(self, s: StageFigures) -> None:
        self._progress.update(self._tasks[s.name], completed=s.done, figures=s.describe())
        now = time.monotonic()
        if self.enabled and not self._live and now - self._printed >= PLAIN_EVERY_S:
            self._printed = now
            self._print_plain()
        if now - self._published >= PUBLISH_EVERY_S:
            self._publish()

    def _print_plain(self) -> None:
        for s in self.stages.values():
            print(f"{s.name}: {s.done}/{s.total} rows, {s.describe()}", file=self._stream, flush=True)

    def _publish(self) -> None:
        self._published = time.monotonic()
        if not self._progress_file:
            return
        stages = {
            s.name: {
                "total": s.total,
                "done": s.done,
                "new": s.new,
                "in_flight": s.in_flight,
                "failed": s.failed,
                "tokens": s.tokens,
                "seconds": round(time.monotonic() - s.started, 3),
            }
            for s in self.stages.values()
        }
        # The last stage's figures are the run's: a row is done when it has gone through every stage.
        write_atomic(Path(self._progress_file), json.dumps({"stage": list(self.stages)[-1], "stages": stages}) + "\n")

    def __enter__(self) -> "RunProgress":
        self._progress.start()
        self._publish()
        return self

    def __exit__(self, *exc) -> None:
        for s in self.stages.values():
            self._progress.update(self._tasks[s.name], completed=s.done, figures=s.describe())
        self._progress.stop()
        if self.enabled and not self._live:
            self._print_plain()
        self._publish()
