"""Label arithmetic against hand-computed values."""

import math

import pytest

from cai.generate.feedback import (
    MAX_MARGIN,
    cohen_kappa,
    ensemble,
    expected_score,
    fleiss_kappa,
    juror_agreement,
    jury,
    label,
    margin,
    normalise,
    position_consistent,
    swap_average,
)


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


@pytest.mark.parametrize(
    "p, expected", [(0.7, "a"), (0.3, "b"), (0.52, "tie"), (0.48, "tie"), (None, "invalid"), (float("nan"), "invalid")]
)
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


def test_jury_is_the_weighted_mean_of_the_jurors_that_gave_a_p():
    # (1 * 0.9 + 2 * 0.3) / 3 = 1.5 / 3 = 0.5; (2 * 0.8 + 0.5 * 0.2) / 2.5 = 1.7 / 2.5 = 0.68
    assert jury({"x": 0.9, "y": 0.3}, {"x": 1.0, "y": 2.0}) == pytest.approx(0.5)
    assert jury({"x": 0.8, "y": 0.2}, {"x": 2.0, "y": 0.5}) == pytest.approx(0.68)
    assert jury({"x": None, "y": 0.2}, {"x": 2.0, "y": 0.5}) == pytest.approx(0.2)  # a juror with no choice is left out
    assert jury({"x": None, "y": None}, {"x": 1.0, "y": 1.0}) is None


def test_cohen_kappa_by_hand():
    # 10 items; x: a a a a a a b b b b, y: a a a a b b b b b a -> agree on 4 + 3 = 7: p_o = 0.7
    # p_x(a) = 0.6, p_y(a) = 0.5: p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    x = list("aaaaaabbbb")
    y = list("aaaabbbbba")
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(x, x) == pytest.approx(1.0)
    assert cohen_kappa(list("aaaa"), list("aaaa")) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None


def test_fleiss_kappa_by_hand():
    # 3 raters, 4 items: (a a a) (a a b) (b b b) (a b b)
    # P_i = (sum n_ik^2 - 3) / 6: (9-3)/6 = 1, (4+1-3)/6 = 1/3, 1, 1/3 -> P = 2/3
    # p_a = (3 + 2 + 0 + 1) / 12 = 0.5, p_b = 0.5 -> P_e = 0.5; kappa = (2/3 - 0.5) / 0.5 = 1/3
    ratings = [list("aaa"), list("aab"), list("bbb"), list("abb")]
    assert fleiss_kappa(ratings) == pytest.approx(1 / 3)
    # with two raters it is Scott's pi: x = a a b b, y = a b b b -> P = 3/4, p_a = 3/8, P_e = 9/64 + 25/64 = 34/64
    assert fleiss_kappa([list("aa"), list("ab"), list("bb"), list("bb")]) == pytest.approx(
        (0.75 - 34 / 64) / (1 - 34 / 64)
    )
    assert fleiss_kappa([]) is None and fleiss_kappa([["a"], ["b"]]) is None


def test_juror_agreement_per_two_jurors_and_overall():
    out = juror_agreement({"j1": list("aabb"), "j2": list("abbb"), "j3": list("aabb")})
    assert out["n"] == 4 and out["jurors"] == ["j1", "j2", "j3"]
    assert {k: v["agree"] for k, v in out["pairs"].items()} == {"j1|j2": 3, "j1|j3": 4, "j2|j3": 3}
    assert out["percent_agreement"] == pytest.approx((0.75 + 1 + 0.75) / 3)
    assert out["pairs"]["j1|j3"]["cohen_kappa"] == pytest.approx(1.0)
