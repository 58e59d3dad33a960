"""The arithmetic of AI-feedback labels: pure functions over the judge's option log-probabilities.

Conventions: a comparison shows two answers, `first` and `second`; "p" is always the probability
that the FIRST answer is the better one, whichever option letter it was shown under.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any, Mapping, Sequence

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
    return (p_first_shown_first > 0.5 and p_first_shown_second > 0.5) or (
        p_first_shown_first < 0.5 and p_first_shown_second < 0.5
    )


def ensemble(probabilities: Sequence[float]) -> float:
    """Mean over principles (the CAI paper ensembles its judge over comparison principles)."""
    if not probabilities:
        raise ValueError("ensemble of no probabilities")
    return sum(probabilities) / len(probabilities)


def jury(probabilities: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """A jury's P(first better), the weighted mean over the jurors that gave one:
    p = sum_j w_j p_j / sum_j w_j, j over the jurors whose p_j is not None; None when none did."""
    given = [(weights[j], p) for j, p in probabilities.items() if p is not None]
    total = sum(w for w, _ in given)
    if not given or total <= 0:
        return None
    return sum(w * p for w, p in given) / total


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), p_o the share
    of items they agree on, p_e = sum_k p_x(k) p_y(k) the agreement expected by chance from each one's
    label frequencies. None when undefined (no items, or p_e = 1: both always give the same label)."""
    n = len(x)
    if n == 0 or n != len(y):
        return None
    observed = sum(a == b for a, b in zip(x, y)) / n
    fx, fy = Counter(x), Counter(y)
    expected = sum(fx[k] * fy[k] for k in fx) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(ratings: Sequence[Sequence[str]]) -> float | None:
    """Fleiss' kappa of m >= 2 raters labelling each of N items (one row of m labels per item):
    P_i = (sum_k n_ik^2 - m) / (m (m - 1)), P = mean_i P_i, p_k = sum_i n_ik / (N m), P_e = sum_k p_k^2,
    kappa = (P - P_e) / (1 - P_e). None when undefined (no items, fewer than 2 raters, or P_e = 1)."""
    if not ratings or len(ratings[0]) < 2:
        return None
    m, n = len(ratings[0]), len(ratings)
    counts = [Counter(row) for row in ratings]
    agreement = sum((sum(c * c for c in row.values()) - m) / (m * (m - 1)) for row in counts) / n
    totals: Counter = Counter()
    for row in counts:
        totals.update(row)
    chance = sum((c / (n * m)) ** 2 for c in totals.values())
    return None if chance == 1 else (agreement - chance) / (1 - chance)


def juror_agreement(labels: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """How jurors' labels (`a`, `b`, `tie`; each juror's list over the same items) agree: per two jurors
    the share of items with the same label and Cohen's kappa, their mean share, and Fleiss' kappa."""
    jurors = list(labels)
    items = list(zip(*labels.values()))
    pairs = {}
    for x, y in combinations(jurors, 2):
        same = sum(a == b for a, b in zip(labels[x], labels[y]))
        pairs[f"{x}|{y}"] = {"agree": same, "n": len(items), "cohen_kappa": cohen_kappa(labels[x], labels[y])}
    shares = [p["agree"] / p["n"] for p in pairs.values() if p["n"]]
    return {
        "jurors": jurors,
        "n": len(items),
        "pairs": pairs,
        "percent_agreement": sum(shares) / len(shares) if shares else None,
        "fleiss_kappa": fleiss_kappa(items),
    }


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
