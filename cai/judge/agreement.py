"""How people labelling the same pairs agree with each other, and how a judge agrees with them.

Human labels are `a` (the pair's first answer is better), `b` or `tie`, several labelers per pair
(the task's overlap), not every labeler on every pair. So:
- percent agreement: over pairs with two labels or more, the mean share of labeler pairs that agree
  (Fleiss' P_i);
- Fleiss' kappa: over the pairs with exactly `overlap` labels (it needs the same number per pair; who
  gave them does not matter);
- Cohen's kappa: per two labelers, over the pairs both labelled.
The judge is measured as `eval-judge` measures it, against the majority human label instead of
HH-RLHF's: the same accuracy, position consistency and ECE figures (eval_judge.agreement_figures),
overall and per principle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from cai.generate.feedback import cohen_kappa, fleiss_kappa
from cai.generate.records import Pair
from cai.judge.eval_judge import agreement_figures

LABELS = ("a", "b", "tie")


def majority(labels: Sequence[str]) -> str | None:
    """The label most labelers gave; None without labels or when two labels lead equally."""
    ranked = Counter(labels).most_common()
    if not ranked or len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def percent_agreement(items: Sequence[Sequence[str]]) -> float | None:
    """Mean over the items with two labels or more of the share of their labeler pairs that agree."""
    shares = []
    for labels in items:
        if len(labels) >= 2:
            same = [x == y for x, y in combinations(labels, 2)]
            shares.append(sum(same) / len(same))
    return sum(shares) / len(shares) if shares else None


def human_human(labels: Mapping[str, Mapping[str, str]], overlap: int) -> dict[str, Any]:
    """`labels`: pair id -> labeler -> label. The figures of the module docstring."""
    items = [list(by_labeler.values()) for by_labeler in labels.values()]
    complete = [x for x in items if len(x) == overlap]
    labelers = sorted({who for by_labeler in labels.values() for who in by_labeler})
    cohen = {}
    for x, y in combinations(labelers, 2):
        shared = [by for by in labels.values() if x in by and y in by]
        if shared:
            cohen[f"{x}|{y}"] = {
                "n": len(shared),
                "agree": sum(by[x] == by[y] for by in shared),
                "cohen_kappa": cohen_kappa([by[x] for by in shared], [by[y] for by in shared]),
            }
    return {
        "labelers": labelers,
        "pairs_labelled": len(items),
        "pairs_multiply_labelled": sum(len(x) >= 2 for x in items),
        "percent_agreement": percent_agreement(items),
        "fleiss_n": len(complete),
        "fleiss_kappa": fleiss_kappa(complete) if overlap >= 2 else None,
        "cohen": cohen,
    }


def oriented(pair: Pair, first_better: bool) -> Pair:
    """The judge's pair as eval-judge reads one: its first answer the one people chose. A swapped copy
    when people chose the second: every probability becomes its complement and every vote's order flips."""
    keep = ("p_first", "principle_probs", "votes", "method")
    if first_better:
        return {k: pair[k] for k in keep if k in pair}
    return {
        "p_first": None if pair.get("p_first") is None else 1 - pair["p_first"],
        "principle_probs": {k: 1 - p for k, p in pair.get("principle_probs", {}).items()},
        "votes": [
            {**v, "swapped": not v["swapped"], "p_first": None if v["p_first"] is None else 1 - v["p_first"]}
            for v in pair.get("votes", [])
        ],
        **({"method": pair["method"]} if "method" in pair else {}),
    }


def principle_view(pair: Pair, principle: str) -> Pair:
    """The pair as that principle's votes alone label it."""
    return {
        "p_first": pair["principle_probs"].get(principle),
        "votes": [v for v in pair["votes"] if v["principle_id"] == principle],
    }


def human_judge(items: Sequence[dict[str, Any]], worst: int = 10) -> dict[str, Any]:
    """`items`: {"id", "labels": [human labels], "answers": [first, second], "judge": the judge's Pair
    (p_first, principle_probs, votes) or None}. Pairs whose majority is `a` or `b` are measured; the
    others are counted. `disagreements`: up to `worst` pairs, the judge's P(the people's choice is
    better) lowest first: the ones to read first."""
    rows, skipped, worst_first = [], Counter(), []
    for item in items:
        if item.get("judge") is None or item["judge"].get("p_first") is None:
            skipped["no_judge_label"] += 1
            continue
        choice = majority(item["labels"])
        if choice not in ("a", "b"):
            skipped["no_majority" if choice is None else "majority_tie"] += 1
            continue
        pair = oriented(item["judge"], choice == "a")
        first, second = item["answers"] if choice == "a" else item["answers"][::-1]
        rows.append({"pairs": [pair], "responses": [first, second], "id": item["id"]})
        worst_first.append({"id": item["id"], "human": choice, "labels": item["labels"], "p_human": pair["p_first"]})
    out: dict[str, Any] = {"skipped": dict(skipped)}
    if not rows:
        return {**out, "n": 0, "overall": None, "by_principle": {}, "disagreements": []}
    principles = sorted({p for row in rows for p in row["pairs"][0].get("principle_probs", {})})
    by_principle = {}
    for principle in principles:
        view = [
            {**row, "pairs": [principle_view(row["pairs"][0], principle)]}
            for row in rows
            if principle in row["pairs"][0]["principle_probs"]
        ]
        by_principle[principle] = agreement_figures(view)
    worst_first.sort(key=lambda d: (d["p_human"], str(d["id"])))
    return {
        **out,
        "n": len(rows),
        "overall": agreement_figures(rows),
        "by_principle": by_principle,
        "disagreements": worst_first[:worst],
    }
