"""The records a run passes from stage to stage and writes to disk: a row (one prompt and what every
stage added to it), the rounds of critique-revision, the pairs the judge compared and their votes,
and the one way to read the answers a pair's indexes point at.

They are TypedDicts, not classes: a row is read from and written to JSONL as it is, and a stage
extends it with `{**row, ...}`. `total=False` because a row grows as it goes: a field is there once
the stage that writes it has run (the docstring of each says which).
"""

from __future__ import annotations

from typing import Any, Iterable, TypedDict


class Message(TypedDict):
    role: str  # "system", "user" or "assistant"
    content: str


class Vote(TypedDict, total=False):
    """One judge answer: which of a pair's answers is better under one principle, in one order."""

    principle_id: str
    swapped: bool  # the pair's second answer was shown first
    p_first: float | None  # P(the pair's first answer is better); None: no usable choice
    method: str  # "logprobs" (option log-probabilities) or "parsed" (a parsed reply)
    juror: str  # with a jury: the judge role that voted
    reasoning: str | None  # with chain of thought: what the judge wrote before choosing
    p_first_raw: float  # with a calibration: the judge's own p_first, before it


class Label(TypedDict, total=False):
    """Votes summed up: swap-averaged per principle, then ensembled over the principles."""

    principle_ids: list[str]
    principle_probs: dict[str, float]  # principle id -> swap-averaged P(first better)
    p_first: float | None
    label: str  # "a", "b", "tie" or "invalid"
    position_consistent: bool | None  # None: no swapped votes to tell
    method: str  # "logprobs", "parsed" or "mixed"


class Pair(Label, total=False):
    """Two of a row's answers compared (compare stage): indexes into `answers(row)`, its votes, its label."""

    answers: list[int]
    votes: list[Vote]
    jurors: dict[str, dict[str, Any]]  # with a jury: each role's Label, with its model and weight
    calibration: str  # with a calibration: the sha256 of its file
    injection: dict[str, Any]  # a probed pair: the votes and label with an instruction planted in the second answer


class Round(TypedDict, total=False):
    """One round of critique-revision (critique_revise), and the judge's verdict on it (revision_check)."""

    principle_id: str
    critique: str
    revision: str
    revision_finish_reason: str
    gain: dict[str, Any]  # p_revision, position_consistent, method, question


class Row(TypedDict, total=False):
    """One prompt and everything the stages added to it."""

    # from the prompt file
    id: str  # a hash of the prompt: stable across runs
    messages: list[Message]
    source: str
    source_id: str | None
    # recorded on every row
    pipeline: str
    seed: int
    constitution_hash: str
    models: dict[str, str]  # role -> model
    principle_ids: list[str]
    flags: list[str]  # why the row stays out of the SFT dataset
    # respond
    response: str
    response_finish_reason: str
    responses: list[str]  # with samples > 1: every sample, `response` being the first
    # critique_revise
    rounds: list[Round]
    revision: str  # the last round's
    # compare
    pairs: list[Pair]
    group_id: str
    # score
    scores: list[Any]
    # revision_check
    revision_check: dict[str, Any]


def row_samples(row: Row) -> list[str]:
    """The responder's answers: its samples when it drew several, else its one answer."""
    return list(row.get("responses") or [row["response"]])


def row_answers(row: Row) -> list[str]:
    """The answers a pair's `answers` indexes point at: the responder's (`row_samples`), then the final
    revision when critique-revision ran."""
    return [*row_samples(row), row["revision"]] if "revision" in row else row_samples(row)


def final_answer(row: Row) -> str:
    """The answer the row stands for: the last revision when critique-revision ran, else the responder's
    (first) answer. The SFT dataset trains on it."""
    return row["revision"] if "revision" in row else row["response"]


def orders_by_principle(votes: Iterable[Vote]) -> dict[str, dict[bool, float | None]]:
    """A pair's votes as principle id -> {swapped: p_first}: each principle's vote in each order it was
    shown in, principles in the order they first voted."""
    orders: dict[str, dict[bool, float | None]] = {}
    for vote in votes:
        orders.setdefault(vote["principle_id"], {})[vote["swapped"]] = vote["p_first"]
    return orders
