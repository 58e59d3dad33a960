"""What every stage sees and returns. A stage takes one row at a time and returns it extended (or raises
RowFailed): rows move through the stages on their own, never waiting for another row."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from cai.core.registry import Registry
from cai.generate.backends.base import Backend
from cai.generate.constitution import Constitution
from cai.generate.records import Row


@dataclass
class StageContext:
    run_seed: int
    stage_name: str
    constitution: Constitution
    backends: dict[str, Backend]  # role -> backend (already wrapped by the call cache)
    models: dict[str, str]  # role -> model name, recorded on rows


@dataclass
class Processed:
    row: Row
    completion_tokens: int = 0


class RowFailed(Exception):
    """This row cannot go on (a call failed after retries); the reason goes to failures.jsonl."""


class Stage(Protocol):
    roles: tuple[str, ...]  # the roles this stage needs a backend for

    async def process(self, row: Row, ctx: StageContext) -> Processed: ...


STAGES: Registry[Callable[[dict[str, Any]], Stage]] = Registry("stage type")
register = STAGES.register


def build(type_name: str, params: dict[str, Any]) -> Stage:
    return STAGES[type_name](params)


async def process_all(stage: Stage, rows: Iterable[Row], ctx: StageContext) -> list[Processed | RowFailed]:
    """Every row through one stage at once (for callers holding a whole set, like eval-judge), in order."""

    async def one(row: Row) -> Processed | RowFailed:
        try:
            return await stage.process(row, ctx)
        except RowFailed as exc:
            return exc

    return list(await asyncio.gather(*(one(row) for row in rows)))
