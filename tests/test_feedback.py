"""Label arithmetic against hand-computed values."""

import math

import pytest

from cai.feedback import MAX_MARGIN, ensemble, expected_score, label, margin, normalise, position_consistent, swap_average


def test_normalise_over_the_options_only():
    # P(A) = e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1) = 0.7310586
    probs = normalise({"A": -1.0, "B": -2.0, "C": -0.1}, ["A", "B"])
    assert probs["A"] == pytest.approx(0.7310586, abs=1e-7)
    assert probs["B"] == pytest.approx(0.2689414, abs=1e-7)


def test_normalise_is_stable_and_handles_missing_options():
    assert normalise({"A": -1000.0, "B": -1001.0}, ["A", "B"])["A"] == pytest.approx(0.7310586, abs=1e-7)
    assert normalise({"A": -3.0}, ["A", "B"]) == {"A": 1.0, "B": 0.0}
    assert normalise({"A": float("-inf"), "B": float("-inf")}, ["A", "B"]) is None


def test_swap_average_and_consistency():
    # first answer shown as (A): P(A) = 0.8; shown as (B) after the swap: P(B) = 0.6
    assert swap_average(0.8, 0.6) == pytest.approx(0.7)
    assert position_consistent(0.8, 0.6)
    # a judge that always says (A): 0.9 when first is A, 0.1 when first is B -> inconsistent, p = 0.5
    assert swap_average(0.9, 0.1) == pytest.approx(0.5)
    assert not position_consistent(0.9, 0.1)
    assert not position_consistent(0.5, 0.7)


def test_ensemble_mean():
    assert ensemble([0.9, 0.6, 0.3]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        ensemble([])


@pytest.mark.parametrize("p, expected", [(0.7, "a"), (0.3, "b"), (0.52, "tie"), (0.48, "tie"), (None, "invalid"), (float("nan"), "invalid")])
def test_labels(p, expected):
    assert label(p, tie_threshold=0.05) == expected


def test_margin_is_capped_log_odds():
    assert margin(0.5) == 0.0
    assert margin(0.8) == pytest.approx(math.log(4))
    assert margin(0.2) == pytest.approx(math.log(4))
    assert margin(1.0) == MAX_MARGIN


def test_expected_score():
    # all mass on 7 and 9 with log-probs log 0.25 and log 0.75 -> 0.25*7 + 0.75*9 = 8.5
    assert expected_score({"7": math.log(0.25), "9": math.log(0.75)}) == pytest.approx(8.5)
    # uniform over 1..10 -> 5.5
    assert expected_score({str(s): -2.0 for s in range(1, 11)}) == pytest.approx(5.5)
    assert expected_score({"x": 0.0}) is None
