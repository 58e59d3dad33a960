"""Run a stage over a few rows at once, as the pipeline would (each row on its own, all concurrently),
and collect what a test checks: the rows, the failures and the tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cai.generate.stages import RowFailed
from cai.generate.stages.base import process_all


@dataclass
class StageRun:
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    completion_tokens: int = 0


def run_stage(stage, rows, ctx) -> StageRun:
    out = StageRun()
    for row, result in zip(rows, asyncio.run(process_all(stage, rows, ctx))):
        if isinstance(result, RowFailed):
            out.failures.append({"id": row["id"], "reason": str(result)})
        else:
            out.rows.append(result.row)
            out.completion_tokens += result.completion_tokens
    return out
