"""The arithmetic of AI-feedback labels: pure functions over the judge's option log-probabilities.

Conventions: a comparison shows two answers, `first` and `second`; "p" is always the probability
that the FIRST answer is the better one, whichever option letter it was shown under.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

MAX_MARGIN = 5.0  # log-odds cap: p = 0.9933; beyond it a 135M or 70B judge is equally over-confident


def normalise(logprobs: Mapping[str, float], options: Sequence[str]) -> dict[str, float] | None:
    """P(option) = exp(lp_o) / sum_o' exp(lp_o') over the options only (the CAI paper's soft labels).

    None when no option has any probability (every log-prob -inf): the judge gave no usable choice.
    """
    values = [logprobs.get(o, float("-inf")) for o in options]
    top = max(values)
    if top == float("-inf"):
        return None
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return {o: w / total for o, w in zip(options, weights)}


def swap_average(p_first_shown_first: float, p_first_shown_second: float) -> float:
    """Average of both presentation orders (RLAIF's position debiasing): P(first answer better)."""
    return (p_first_shown_first + p_first_shown_second) / 2


def position_consistent(p_first_shown_first: float, p_first_shown_second: float) -> bool:
    """Both orders prefer the same answer (a strict majority each time)."""
    return (p_first_shown_first > 0.5 and p_first_shown_second > 0.5) or (p_first_shown_first < 0.5 and p_first_shown_second < 0.5)


def ensemble(probabilities: Sequence[float]) -> float:
    """Mean over principles (the CAI paper ensembles its judge over comparison principles)."""
    if not probabilities:
        raise ValueError("ensemble of no probabilities")
    return sum(probabilities) / len(probabilities)


def label(p: float | None, tie_threshold: float) -> str:
    """`a` (first better), `b` (second better), `tie` (|p - 0.5| < threshold) or `invalid` (no p)."""
    if p is None or math.isnan(p):
        return "invalid"
    if abs(p - 0.5) < tie_threshold:
        return "tie"
    return "a" if p > 0.5 else "b"


def margin(p: float) -> float:
    """The judge's confidence as log-odds of its preferred side, |log(p / (1 - p))|, capped at MAX_MARGIN."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    return min(abs(math.log(p / (1 - p))), MAX_MARGIN)


def expected_score(logprobs: Mapping[str, float], scores: Sequence[int] = tuple(range(1, 11))) -> float | None:
    """d-RLAIF: the expectation of the score under the judge's probabilities of the score tokens."""
    probs = normalise(logprobs, [str(s) for s in scores])
    if probs is None:
        return None
    return sum(s * probs[str(s)] for s in scores)
