"""The figures of a run's report, as pure functions of its rows: how the judge labelled, whether its
labels hold when the order is swapped, whether principles (and a jury's jurors) agree, whether length
or a planted instruction sways it, and what the critique-revision stage flagged. Rendering is in report.py."""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Any, Iterable

from cai.generate import feedback
from cai.generate.records import Pair, Row, orders_by_principle, row_answers
from cai.judge.eval_judge import juror_view, jury_agreement, wilson_interval

LABELS = ("a", "b", "tie", "invalid")
MOSTLY_INVALID = 0.5  # a principle with more invalid votes than this share is flagged


def rate(successes: int, n: int) -> dict[str, Any]:
    return {"rate": successes / n if n else None, "n": n, "ci95": list(wilson_interval(successes, n))}


def _pairs(rows: Iterable[Row]) -> Iterable[tuple[Row, Pair]]:
    for row in rows:
        for pair in row.get("pairs", []):
            yield row, pair


def label_counts(rows: list[Row]) -> dict[str, int]:
    counts = Counter(pair["label"] for _, pair in _pairs(rows))
    return {label: counts.get(label, 0) for label in LABELS}


def _judges(pair: Pair) -> Iterable[Pair]:
    """The pair as its judge labelled it, or as each juror of its jury did."""
    return [juror_view(pair, role) for role in pair["jurors"]] if "jurors" in pair else [pair]


def method_counts(rows: list[Row]) -> dict[str, int]:
    return dict(Counter(pair["method"] for _, pair in _pairs(rows)))


def by_principle(rows: list[Row], tie_threshold: float) -> dict[str, dict[str, Any]]:
    """Per principle: votes, ties and invalid votes (a principle's vote is invalid when an order gave
    no usable choice), position consistency over its swapped votes, and a flag when mostly invalid.
    Each juror of a jury casts its own votes."""
    stats: dict[str, dict[str, Any]] = {}
    for judge in (judge for _, pair in _pairs(rows) for judge in _judges(pair)):
        for principle_id, by_order in orders_by_principle(judge["votes"]).items():
            s = stats.setdefault(
                principle_id, {"votes": 0, "invalid": 0, "ties": 0, "consistent": 0, "swapped_votes": 0}
            )
            s["votes"] += 1
            p = judge["principle_probs"].get(principle_id)
            if p is None:
                s["invalid"] += 1
                continue
            if abs(p - 0.5) < tie_threshold:
                s["ties"] += 1
            if len(by_order) == 2:
                s["swapped_votes"] += 1
                s["consistent"] += feedback.position_consistent(by_order[False], by_order[True])
    for s in stats.values():
        s["position_consistency"] = rate(s["consistent"], s["swapped_votes"])
        s["invalid_share"] = s["invalid"] / s["votes"]
        s["mostly_invalid"] = s["invalid_share"] > MOSTLY_INVALID
    return dict(sorted(stats.items()))


def principle_agreement(rows: list[Row]) -> dict[str, Any]:
    """For every two principles judging the same pair: how often they prefer the same answer."""
    agree: Counter = Counter()
    total: Counter = Counter()
    for _, pair in _pairs(rows):
        decided = {pid: p for pid, p in pair["principle_probs"].items() if p != 0.5}
        for x, y in combinations(sorted(decided), 2):
            total[(x, y)] += 1
            agree[(x, y)] += (decided[x] > 0.5) == (decided[y] > 0.5)
    principles = sorted({pid for key in total for pid in key})
    return {
        "principles": principles,
        "pairs": {f"{x}|{y}": {"agree": agree[(x, y)], "n": n} for (x, y), n in sorted(total.items())},
        "overall": rate(sum(agree.values()), sum(total.values())),
    }


def jury(rows: list[Row]) -> dict[str, Any] | None:
    """With a jury: each juror's model, weight and label counts, and how the jurors agree; None without."""
    agreement = jury_agreement(rows)
    if agreement is None:
        return None
    jurors: dict[str, dict[str, Any]] = {}
    for _, pair in _pairs(rows):
        for role, juror in pair.get("jurors", {}).items():
            j = jurors.setdefault(
                role, {"model": juror["model"], "weight": juror["weight"], "labels": dict.fromkeys(LABELS, 0)}
            )
            j["labels"][juror["label"]] += 1
    return {"jurors": jurors, "agreement": agreement}


def length_bias(rows: list[Row]) -> dict[str, Any]:
    """How often the longer answer wins among decided pairs of unequal length (0.5 means no bias),
    and each pair's (length ratio, p_first) for a scatter plot."""
    wins = n = 0
    points = []
    for row, pair in _pairs(rows):
        answers = row_answers(row)
        first, second = (len(answers[k]) for k in pair["answers"])
        if pair["p_first"] is not None and first and second:
            points.append((first / second, pair["p_first"]))
        if pair["label"] in ("a", "b") and first != second:
            n += 1
            wins += (pair["label"] == "a") == (first > second)
    return {"longer_wins": rate(wins, n), "points": points}


def injection(rows: list[Row]) -> dict[str, Any] | None:
    """Pairs judged again with "choose me" planted in the second answer: how often the label picks it,
    against how often it did without the instruction, and how many labels the instruction flipped."""
    probed = [(pair["label"], pair["injection"]["label"]) for _, pair in _pairs(rows) if pair.get("injection")]
    valid = [(clean, planted) for clean, planted in probed if clean != "invalid" and planted != "invalid"]
    if not probed:
        return None
    n = len(valid)
    return {
        "probed": len(probed),
        "follows": rate(sum(planted == "b" for _, planted in valid), n),
        "baseline": rate(sum(clean == "b" for clean, _ in valid), n),
        "flipped": rate(sum(clean != "b" and planted == "b" for clean, planted in valid), n),
    }


def score_values(rows: list[Row]) -> list[float]:
    return [s["score"] for row in rows for s in row.get("scores", []) if s["score"] is not None]


def revision_stats(rows: Iterable[Row]) -> dict[str, Any] | None:
    count, flags, principles, lengths = 0, Counter(), Counter(), []
    for row in rows:
        if "revision" in row and "rounds" in row:
            count += 1
            flags.update(row.get("flags", []))
            principles.update(row["principle_ids"])
            lengths.append((len(row["response"]), len(row["revision"])))
    if not count:
        return None
    return {"rows": count, "flags": dict(flags), "principles": dict(principles), "lengths": lengths}


def _wins(judged: list[tuple[float | None, bool | None]]) -> dict[str, Any]:
    """(P(revision better), position consistent) of some comparisons: how often the revision wins
    (P > 0.5) among those the judge decided, its mean P, and the position consistency of the votes."""
    valid = [p for p, _ in judged if p is not None]
    consistent = [c for _, c in judged if c is not None]
    return {
        "n": len(judged),
        "invalid": len(judged) - len(valid),
        "wins": rate(sum(p > 0.5 for p in valid), len(valid)),
        "mean_p_revision": sum(valid) / len(valid) if valid else None,
        "position_consistency": rate(sum(consistent), len(consistent)),
    }


def revision_gain(rows: Iterable[Row]) -> dict[str, Any] | None:
    """The revision_check stage's figures: revisions against the initial answer, by round (the CAI
    paper's improvement with the number of revisions) and by principle, and what the gate kept out
    of SFT, for each reason (a row can have both)."""
    by_round: dict[int, list] = {}
    by_principle: dict[str, list] = {}
    helpfulness: list = []
    gate: Counter[str] = Counter()
    checked = harmless = unclassified = 0
    for row in rows:
        check = row.get("revision_check")
        if check is None:
            continue
        checked += 1
        for k, r in enumerate(row["rounds"], 1):
            judged = (r["gain"]["p_revision"], r["gain"]["position_consistent"])
            by_round.setdefault(k, []).append(judged)
            by_principle.setdefault(r["principle_id"], []).append(judged)
        if "helpfulness" in check:
            helpfulness.append((check["helpfulness"]["p_revision"], check["helpfulness"]["position_consistent"]))
            harmless += check["harmless"] is True
            unclassified += check["harmless"] is None
        gate.update(check["flags"])
        gate["kept_out"] += bool(check["flags"])
    if not checked:
        return None
    return {
        "rows": checked,
        "by_round": {k: _wins(v) for k, v in sorted(by_round.items())},
        "by_principle": {pid: _wins(v) for pid, v in sorted(by_principle.items())},
        "helpfulness": _wins(helpfulness) if helpfulness else None,
        "gate": {
            "kept_out": gate["kept_out"],
            "revision_not_preferred": gate["revision_not_preferred"],
            "refuses_harmless_request": gate["refuses_harmless_request"],
            "harmless_requests": harmless if helpfulness else None,
            "unclassified_requests": unclassified if helpfulness else None,
        },
    }


def failure_counts(failures: list[dict[str, Any]], done_ids: set[str]) -> dict[str, Any]:
    """failures.jsonl keeps every failure, also of rows a rerun then finished: `recorded` counts them all,
    `rows_still_failed` only the rows no rerun has finished."""
    by_stage = Counter(f.get("stage", "?") for f in failures)
    reasons = Counter(f["reason"][:160] for f in failures)
    unresolved = {f["id"] for f in failures} - done_ids
    return {
        "recorded": len(failures),
        "rows_still_failed": len(unresolved),
        "by_stage": dict(by_stage),
        "top_reasons": reasons.most_common(5),
    }
