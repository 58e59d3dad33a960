"""A finished run's rows for the dashboard's row browser (filtered, a page at a time, each row whole:
its answers, critiques, revisions and votes), its failed rows, and two runs' rows of the same prompt
side by side. Rows are read as they stream from datasets/rows.jsonl: only the page is kept."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.disk import read_jsonl
from cai.core.errors import InputError
from cai.generate.records import Row, row_answers
from cai.generate.store import RunStore
from cai.judge.run_stats import label_counts

ROWS = Path("datasets") / "rows.jsonl"
PAGE = 20


@dataclass(frozen=True)
class RowFilter:
    q: str = ""  # words the row's text holds (prompt, answers, critiques, revisions), any case
    flag: str = ""  # a flag the row carries (why it stays out of SFT)
    principle: str = ""  # a principle its critiques or its pairs' votes used
    label: str = ""  # a label one of its pairs got: a, b, tie or invalid

    def matches(self, row: Row) -> bool:
        if self.flag and self.flag not in row.get("flags", []):
            return False
        if self.principle and self.principle not in principles(row):
            return False
        if self.label and self.label not in {p.get("label") for p in row.get("pairs", [])}:
            return False
        return not self.q or self.q.lower() in text(row).lower()


def principles(row: Row) -> set[str]:
    used = set(row.get("principle_ids", []))
    used.update(r["principle_id"] for r in row.get("rounds", []) if "principle_id" in r)
    for pair in row.get("pairs", []):
        used.update(pair.get("principle_ids", []))
    return used


def text(row: Row) -> str:
    parts = [m["content"] for m in row.get("messages", [])]
    parts += row_answers(row) if "response" in row else []
    for r in row.get("rounds", []):
        parts += [r.get("critique", ""), r.get("revision", "")]
    return "\n".join(parts)


def rows_file(run_dir: Path, shown: str) -> Path:
    path = run_dir / ROWS
    if not path.is_file():
        raise InputError(shown, None, "the run has not exported its rows yet: they are browsable once it finishes")
    return path


def browse(run_dir: Path, shown: str, where: RowFilter, offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
    """The rows matching `where`, `limit` from `offset` on, the number matching, and what the filters
    may choose from (the run's flags, principles and labels)."""
    page, total, seen = [], 0, Choices()
    for row in read_jsonl(rows_file(run_dir, shown)):
        seen.add(row)
        if where.matches(row):
            if offset <= total < offset + limit:
                page.append(row)
            total += 1
    return {"total": total, "offset": offset, "rows": page, "choices": seen.json()}


class Choices:
    """What the filters may choose from: the flags, principles and pair labels of the rows seen."""

    def __init__(self):
        self.flag, self.principle, self.label = set(), set(), set()

    def add(self, row: Row) -> None:
        self.flag.update(row.get("flags", []))
        self.principle.update(principles(row))
        self.label.update(p.get("label") for p in row.get("pairs", []))

    def json(self) -> dict[str, list[str]]:
        return {"flag": sorted(self.flag), "principle": sorted(self.principle), "label": sorted(self.label)}


def failed(run_dir: Path, stage: str = "", q: str = "", offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
    """The run's failed rows (failures.jsonl: the stage, the reason), of one stage or all."""
    every = RunStore(run_dir).failures()
    found = [
        f for f in every if (not stage or f.get("stage") == stage) and q.lower() in str(f.get("reason", "")).lower()
    ]
    return {
        "total": len(found),
        "offset": offset,
        "failures": found[offset : offset + limit],
        "choices": {"stage": sorted({f.get("stage", "") for f in every})},
    }


def counts(rows: Iterable[Row]) -> dict[str, Any]:
    """What the two-run view compares at a glance: rows, flagged rows and their flags, pair labels."""
    rows = list(rows)
    flags = Counter(f for row in rows for f in row.get("flags", []))
    return {
        "rows": len(rows),
        "flagged": sum(bool(row.get("flags")) for row in rows),
        "flags": dict(flags),
        "labels": label_counts(rows) if any("pairs" in row for row in rows) else None,
    }


def side_by_side(
    run_a: Path, shown_a: str, run_b: Path, shown_b: str, where: RowFilter, offset: int = 0, limit: int = PAGE
) -> dict[str, Any]:
    """Two runs: each one's counts, and the rows of the prompts both ran (a row's id is its prompt's
    hash, the same in every run), those where either side matches `where`, in the first run's order."""
    second = {row["id"]: row for row in read_jsonl(rows_file(run_b, shown_b))}
    first = list(read_jsonl(rows_file(run_a, shown_a)))
    shared = [(row, second[row["id"]]) for row in first if row["id"] in second]
    matching = [(a, b) for a, b in shared if where.matches(a) or where.matches(b)]
    seen = Choices()
    for a, b in shared:
        seen.add(a)
        seen.add(b)
    return {
        "a": {"run_dir": shown_a, **counts(first)},
        "b": {"run_dir": shown_b, **counts(second.values())},
        "shared": len(shared),
        "total": len(matching),
        "offset": offset,
        "rows": [{"id": a["id"], "a": a, "b": b} for a, b in matching[offset : offset + limit]],
        "choices": seen.json(),
    }
