"""eval-judge's accuracy split by length, against a hand-labelled example: the accuracy on the pairs where
people chose the longer answer, on those where they chose the shorter, their mean (the length-balanced
accuracy), and the line the terminal summary prints under the accuracy."""

from __future__ import annotations

import pytest

from cai.cli import _length_split_line
from cai.judge.eval_judge import agreement_figures, wilson_interval


def row(p_first: float, chosen: str, rejected: str) -> dict:
    """A judged pair as the compare stage leaves it: P(chosen better) in both orders, the same."""
    votes = [
        {"principle_id": "p", "swapped": swapped, "p_first": p, "method": "logprobs"}
        for swapped, p in ((False, p_first), (True, 1 - p_first))
    ]
    return {"responses": [chosen, rejected], "pairs": [{"answers": [0, 1], "votes": votes, "p_first": p_first}]}


# A judge that always prefers the longer answer, on 3 chosen-longer pairs and 2 chosen-shorter ones,
# plus a pair of equal length (judged right) and one it prefers neither answer of.
ROWS = [
    row(0.9, "a long answer", "short"),
    row(0.8, "another long one", "no"),
    row(0.7, "longer again", "nope"),
    row(0.2, "no", "a long rejected answer"),
    row(0.1, "ok", "rambling and rejected"),
    row(0.9, "same", "size"),
    row(0.5, "tied!", "x"),
]


def test_split_accuracies_by_hand() -> None:
    figures = agreement_figures(ROWS)
    assert figures["n"] == 7
    assert figures["accuracy"] == pytest.approx(4.5 / 7)  # 3 longer + the equal pair + half the tie
    assert figures["length_n"] == 6  # the pair of equal length is left out of the length figures
    assert (figures["chosen_longer_n"], figures["chosen_shorter_n"]) == (4, 2)
    assert figures["accuracy_chosen_longer"] == pytest.approx(3.5 / 4)
    assert figures["accuracy_chosen_longer_ci95"] == pytest.approx(list(wilson_interval(3.5, 4)))
    assert figures["accuracy_chosen_shorter"] == 0.0
    assert figures["length_balanced_accuracy"] == pytest.approx((3.5 / 4 + 0) / 2)
    assert figures["length_win_rate"] == pytest.approx(5.5 / 6)  # the old keys stay
    assert figures["human_length_win_rate"] == pytest.approx(4 / 6)


def test_one_sided_sets_have_no_balanced_accuracy() -> None:
    figures = agreement_figures(ROWS[:3])
    assert figures["chosen_shorter_n"] == 0 and figures["length_balanced_accuracy"] is None
    assert figures["accuracy_chosen_shorter_ci95"] == [0.0, 1.0]
    assert "length-balanced" in _length_split_line(figures) and " - " in _length_split_line(figures)


def test_the_terminal_line() -> None:
    line = _length_split_line(agreement_figures(ROWS))
    assert line.split() == "length-balanced 0.438 (0.875 on 4 chosen-longer, 0.000 on 2 chosen-shorter)".split()
