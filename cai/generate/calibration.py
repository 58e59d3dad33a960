"""Judge calibration: a temperature and a position offset on the judge's log-odds, fitted on pairs
with human labels, and how well the judge's probabilities match how often it is right.

Model (Platt scaling with a position term, in the letter frame): a vote shows two answers under the
letters A and B; z = log(P(A) / P(B)) is the judge's log-odds for A, and

    P_cal(A) = sigmoid((z - b) / T)

b (`position_offset`) is the judge's pull towards the letter A, whatever the answers are; T
(`temperature`) > 0 scales its confidence. A vote's probability that the pair's FIRST answer is better
(feedback.py's convention) is P_cal(A) when the first answer was shown as A, 1 - P_cal(A) after the swap.
Only log-probability votes are calibrated: a parsed choice has no log-odds to rescale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cai.core.disk import written_atomically
from cai.core.files import load_yaml, sha256_file, validate
from cai.generate.records import Vote

# A vote stores its probability, not its log-odds: beyond |z| = 30, 1 - p is within a few ulps of 0
# in float64 and the log-odds read back are noise (and p = 1 exactly, from a judge that gives B no
# probability at all, would be infinite).
LOGIT_CAP = 30.0
# Fit: a weak Gaussian prior (sd 10) on 1/T around 1 and on -b/T around 0 keeps the optimum finite
# when the judge separates the labels perfectly or not at all; on a few hundred votes it moves
# nothing measurable. 1/T >= 0.001: a judge whose log-odds carry no signal (or the wrong one) gets
# T = 1000, which maps every vote within 0.01 of 0.5 (|z - b| < 40), rather than a negative temperature.
PRIOR = 1e-2
MIN_SLOPE = 1e-3
FORMULA = "P(A) = sigmoid((log(P(A) / P(B)) - position_offset) / temperature)"


def sigmoid(s: float) -> float:
    if s >= 0:
        return 1 / (1 + math.exp(-s))
    e = math.exp(s)
    return e / (1 + e)


def softplus(s: float) -> float:
    """log(1 + e^s), without overflow."""
    return max(s, 0.0) + math.log1p(math.exp(-abs(s)))


def logit(p: float) -> float:
    """log(p / (1 - p)), capped at +-LOGIT_CAP."""
    if p <= 0.0:
        return -LOGIT_CAP
    if p >= 1.0:
        return LOGIT_CAP
    return min(max(math.log(p) - math.log1p(-p), -LOGIT_CAP), LOGIT_CAP)


def letter_log_odds(p_first: float, swapped: bool) -> float:
    """z = log(P(A) / P(B)) of a vote that gave P(first answer better) = p_first."""
    return logit(1 - p_first if swapped else p_first)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    position_offset: float = 0.0
    sha256: str | None = None  # of the file it was read from: recorded on every pair it calibrates

    def p_a(self, z: float) -> float:
        return sigmoid((z - self.position_offset) / self.temperature)

    def p_first(self, p_first: float, swapped: bool) -> float:
        """A vote's P(first better), calibrated in the letter frame and mapped back to the pair's first answer."""
        p_a = self.p_a(letter_log_odds(p_first, swapped))
        return 1 - p_a if swapped else p_a

    def vote(self, record: Vote) -> Vote:
        """A compare vote record with its `p_first` calibrated and the judge's own kept as `p_first_raw`;
        votes without log-probabilities (none, or a parsed choice) are returned as they are."""
        p = record.get("p_first_raw", record["p_first"])
        if p is None or record["method"] != "logprobs":
            return record
        return {**record, "p_first": self.p_first(p, record["swapped"]), "p_first_raw": p}


IDENTITY = Calibration()


def uncalibrated(record: Vote) -> Vote:
    """A compare vote record with the judge's own probability, as if no calibration had been applied."""
    if "p_first_raw" not in record:
        return record
    out = {k: v for k, v in record.items() if k != "p_first_raw"}
    out["p_first"] = record["p_first_raw"]
    return out


def nll(z: Sequence[float], y: Sequence[float], calibration: Calibration = IDENTITY) -> float:
    """Mean negative log-likelihood of labels y (1: A is better) under P_cal(A):
    -1/N sum_i [y_i log P_cal(A)_i + (1 - y_i) log(1 - P_cal(A)_i)], with s_i = (z_i - b) / T
    written as softplus(s_i) - y_i s_i so a confident wrong vote costs |s_i| instead of log(0)."""
    if not z:
        raise ValueError("nll of no votes")
    total = 0.0
    for zi, yi in zip(z, y):
        s = (zi - calibration.position_offset) / calibration.temperature
        total += softplus(s) - yi * s
    return total / len(z)


def fit(z: Sequence[float], y: Sequence[float]) -> Calibration:
    """(T, b) minimising nll(z, y) over votes with log-odds z (letter frame) and labels y (1: A better).

    Solved as a logistic regression s = a z + c (a = 1/T, c = -b/T), which is convex in (a, c):
    Newton's method with step halving, the prior above, and a >= MIN_SLOPE (if the free optimum has a
    smaller slope, the constrained one lies on a = MIN_SLOPE: a one-dimensional Newton in c). Same
    votes, same result: no randomness, no learning rate.
    """
    if not z:
        raise ValueError("a calibration needs at least one vote")
    a, c = _newton(z, y, 1.0, 0.0, free_slope=True)
    if a < MIN_SLOPE:
        a, c = _newton(z, y, MIN_SLOPE, c, free_slope=False)
    return Calibration(temperature=1 / a, position_offset=-c / a)


def _objective(z, y, a: float, c: float) -> float:
    return sum(softplus(a * zi + c) - yi * (a * zi + c) for zi, yi in zip(z, y)) + PRIOR / 2 * ((a - 1) ** 2 + c**2)


def _newton(z, y, a: float, c: float, free_slope: bool) -> tuple[float, float]:
    value = _objective(z, y, a, c)
    for _ in range(200):
        ga, gc = PRIOR * (a - 1), PRIOR * c
        haa, hac, hcc = PRIOR, 0.0, PRIOR
        for zi, yi in zip(z, y):
            p = sigmoid(a * zi + c)
            w = p * (1 - p)
            ga += (p - yi) * zi
            gc += p - yi
            haa += w * zi * zi
            hac += w * zi
            hcc += w
        if free_slope:
            det = haa * hcc - hac * hac
            da, dc = (hcc * ga - hac * gc) / det, (haa * gc - hac * ga) / det
        else:
            da, dc = 0.0, gc / hcc
        step = 1.0
        while step > 1e-12:
            trial = _objective(z, y, a - step * da, c - step * dc)
            if trial <= value:
                break
            step /= 2
        else:
            break  # no step lowers the objective: at the optimum to float precision
        a, c, value = a - step * da, c - step * dc, trial
        if abs(step * da) < 1e-10 and abs(step * dc) < 1e-10:
            break
    return a, c


def credit(p_first: float) -> float:
    """1 when the first answer is preferred (p > 0.5), 0.5 at exactly 0.5 (a coin flip), else 0."""
    return 1.0 if p_first > 0.5 else 0.5 if p_first == 0.5 else 0.0


def reliability(p_first: Sequence[float], bins: int = 10) -> list[dict[str, Any]]:
    """Reliability bins of the judge's chosen side, for pairs whose FIRST answer is the better one
    (eval-judge shows the human-chosen answer first). Confidence = max(p, 1 - p), in [0.5, 1]; correct =
    credit(p). Bins: `bins` equal widths over [0.5, 1] (the last one holds 1.0); each gives its number
    of pairs n, mean confidence and mean correctness (None when empty)."""
    members: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p in p_first:
        confidence = max(p, 1 - p)
        index = min(int(confidence * 2 * bins) - bins, bins - 1)  # conf * 2 * bins: exact at the edges 0.5 + k/(2 bins)
        members[index].append((confidence, credit(p)))
    out = []
    for k, group in enumerate(members):
        n = len(group)
        out.append(
            {
                "lower": 0.5 + k / (2 * bins),
                "upper": 0.5 + (k + 1) / (2 * bins),
                "n": n,
                "confidence": sum(c for c, _ in group) / n if n else None,
                "accuracy": sum(a for _, a in group) / n if n else None,
            }
        )
    return out


def expected_calibration_error(bins: Sequence[dict[str, Any]]) -> float | None:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over reliability bins (Guo et al., 2017): the mean gap
    between how sure the judge is of its choice and how often that choice is right. None: no pairs."""
    total = sum(b["n"] for b in bins)
    if not total:
        return None
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])


def load(path: str | Path) -> Calibration:
    """A calibration file (`cai eval-judge --calibrate`); a bad one is an InputError naming the file and field."""
    doc = load_yaml(path)  # JSON is YAML
    validate(doc, "calibration", str(path))
    return Calibration(float(doc["temperature"]), float(doc["position_offset"]), sha256_file(path))


def reliability_plot(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]] | None, path: Path) -> None:
    """The reliability diagram: accuracy per confidence bin against the diagonal, before and after
    calibration side by side. Written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [("before", before)] + ([("after (cross-fitted)", after)] if after is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, bins) in zip(axes[0], panels):
        filled = [b for b in bins if b["n"]]
        width = bins[0]["upper"] - bins[0]["lower"]
        ax.bar(
            [b["lower"] for b in filled],
            [b["accuracy"] for b in filled],
            width=width,
            align="edge",
            edgecolor="black",
            label="accuracy",
        )
        # the bin's mean confidence over its bar: the gap between them is what ECE averages
        ax.plot(
            [b["lower"] + width / 2 for b in filled],
            [b["confidence"] for b in filled],
            "D",
            color="tab:red",
            label="mean confidence",
        )
        ax.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfect calibration")
        for b in filled:
            ax.annotate(str(b["n"]), (b["lower"] + width / 2, 0.02), ha="center", fontsize="x-small")
        ece = expected_calibration_error(bins)
        ax.set_title(f"{title}: ECE {ece:.3f}" if ece is not None else title)
        ax.set_xlim(0.5, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence in the chosen answer")
        ax.set_ylabel("share right (pairs per bin at the bottom)")
        ax.legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    try:
        with written_atomically(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
