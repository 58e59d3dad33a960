"""Agreement between labelers, and between a judge and the labelers' majority, against figures worked
out by hand."""

from __future__ import annotations

import pytest

from cai.judge.agreement import human_human, human_judge, majority, oriented, percent_agreement

# Two labelers on four pairs (overlap 2), a third alone on a fifth.
LABELS = {
    1: {"alice": "a", "bob": "a"},
    2: {"alice": "a", "bob": "b"},
    3: {"alice": "b", "bob": "b"},
    4: {"alice": "tie", "bob": "a"},
    5: {"carol": "a"},
}


def test_majority_needs_a_single_leader():
    assert majority(["a", "b", "a"]) == "a"
    assert majority(["a", "b"]) is None and majority([]) is None
    assert majority(["tie", "tie", "b"]) == "tie"


def test_human_human_figures_by_hand():
    figures = human_human(LABELS, overlap=2)
    # pairs 1-4 have two labels each: agree, disagree, agree, disagree
    assert figures["percent_agreement"] == pytest.approx(0.5)
    assert figures["pairs_labelled"] == 5 and figures["pairs_multiply_labelled"] == 4
    # Fleiss over pairs 1-4: P = (1 + 0 + 1 + 0) / 4 = 1/2; p_a = 4/8, p_b = 3/8, p_tie = 1/8,
    # P_e = 16/64 + 9/64 + 1/64 = 26/64; kappa = (32/64 - 26/64) / (38/64) = 3/19
    assert figures["fleiss_n"] == 4
    assert figures["fleiss_kappa"] == pytest.approx(3 / 19)
    # Cohen, alice and bob: p_o = 2/4; alice a2 b1 tie1, bob a2 b2: p_e = (2*2 + 1*2) / 16 = 3/8;
    # kappa = (1/2 - 3/8) / (5/8) = 1/5. Carol shares no pair with anyone.
    assert figures["cohen"] == {"alice|bob": {"n": 4, "agree": 2, "cohen_kappa": pytest.approx(0.2)}}
    assert figures["labelers"] == ["alice", "bob", "carol"]


def test_percent_agreement_of_three_labelers_counts_labeler_pairs():
    # a, a, b: one agreeing pair of three
    assert percent_agreement([["a", "a", "b"], ["a"]]) == pytest.approx(1 / 3)
    assert percent_agreement([["a"]]) is None


def vote(principle: str, swapped: bool, p: float) -> dict:
    return {"principle_id": principle, "swapped": swapped, "p_first": p, "method": "logprobs"}


def judge(p1: tuple[float, float] | None = None, p2: tuple[float, float] | None = None) -> dict:
    """The judge's pair from each principle's (first shown first, first shown second) P(first better)."""
    votes, probs = [], {}
    for name, ps in (("p1", p1), ("p2", p2)):
        if ps:
            votes += [vote(name, False, ps[0]), vote(name, True, ps[1])]
            probs[name] = (ps[0] + ps[1]) / 2
    return {"p_first": sum(probs.values()) / len(probs), "principle_probs": probs, "votes": votes}


def item(item_id: str, labels: list[str], pair: dict | None) -> dict:
    return {"id": item_id, "labels": labels, "answers": [f"{item_id} one", f"{item_id} second answer"], "judge": pair}


def test_human_judge_figures_by_hand():
    items = [
        item("A", ["a", "a"], judge(p1=(0.9, 0.7))),  # judge 0.8 for the people's choice; both orders agree
        item("B", ["b", "b", "a"], judge(p1=(0.6, 0.8))),  # people chose the second: 0.3 for it
        item("C", ["a", "b"], judge(p1=(0.9, 0.9))),  # no majority
        item("D", ["tie"], judge(p2=(0.9, 0.9))),  # the people call it a tie
        item("E", ["a"], None),  # an HH pair: no judge
        item("F", ["b"], judge(p2=(0.3, 0.5))),  # 0.6 for the people's choice; shown second it was 0.5
    ]
    figures = human_judge(items)
    assert figures["n"] == 3
    assert figures["skipped"] == {"no_majority": 1, "majority_tie": 1, "no_judge_label": 1}
    overall = figures["overall"]
    assert overall["accuracy"] == pytest.approx(2 / 3)  # A and F right, B wrong
    assert overall["position_consistency"] == pytest.approx(2 / 3)  # F's second order sits at 0.5
    # confidences 0.8 (right), 0.7 (wrong), 0.6 (right), each alone in its bin:
    # ECE = (|1 - 0.8| + |0 - 0.7| + |1 - 0.6|) / 3
    assert overall["ece"] == pytest.approx(1.3 / 3)
    assert figures["by_principle"]["p1"]["n"] == 2 and figures["by_principle"]["p1"]["accuracy"] == pytest.approx(0.5)
    assert figures["by_principle"]["p2"]["accuracy"] == pytest.approx(1.0)
    worst = figures["disagreements"]
    assert [w["id"] for w in worst] == ["B", "F", "A"]
    assert [w["p_human"] for w in worst] == pytest.approx([0.3, 0.6, 0.8])
    assert worst[0]["human"] == "b"


def test_orienting_a_pair_swaps_every_order_and_probability():
    pair = judge(p1=(0.9, 0.6))
    flipped = oriented(pair, first_better=False)
    assert flipped["p_first"] == pytest.approx(0.25) and flipped["principle_probs"] == {"p1": pytest.approx(0.25)}
    assert [(v["swapped"], v["p_first"]) for v in flipped["votes"]] == [
        (True, pytest.approx(0.1)),
        (False, pytest.approx(0.4)),
    ]
    assert oriented(flipped, first_better=False)["votes"] == pair["votes"]
