"""What every stage sees and returns. A stage maps a chunk of rows to output rows or failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cai.backends.base import Backend
from cai.constitution import Constitution
from cai.registry import Registry

Row = dict[str, Any]


@dataclass
class StageContext:
    run_seed: int
    stage_name: str
    constitution: Constitution
    backends: dict[str, Backend]  # role -> backend (already wrapped by the call cache)
    models: dict[str, str]  # role -> model name, recorded on rows


@dataclass
class StageResult:
    rows: list[Row] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason"}
    completion_tokens: int = 0


class Stage(Protocol):
    roles: tuple[str, ...]  # the roles this stage needs a backend for

    def run(self, rows: list[Row], ctx: StageContext) -> StageResult: ...


STAGES: Registry[Callable[[dict[str, Any]], Stage]] = Registry("stage type")
register = STAGES.register


def build(type_name: str, params: dict[str, Any]) -> Stage:
    return STAGES[type_name](params)
