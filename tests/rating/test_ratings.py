"""The rating arithmetic of `cai.rating.ratings`: Bradley-Terry strengths on soft labels (against hand-computed
values and an independent minorise-maximise fit), the coverage of the prompt bootstrap's intervals, the ridge,
AlpacaEval-style length-controlled win rates, and the refusal detector. Every expected number is computed here
from the formulas, never by the module under test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cai.rating import ratings
from cai.rating.ratings import Comparison

ELO_PER_LN = 400 / math.log(10)


def true_elo(theta: float) -> float:
    return 1000 + ELO_PER_LN * theta


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_on_a_tree_is_the_logit_of_each_label():
    # On a tree every edge's fitted probability can equal its label exactly, so theta_A - theta_B = logit(0.75).
    comparisons = [Comparison("p1", "A", "B", 0.75), Comparison("p2", "B", "C", 0.75)]
    theta = ratings.bradley_terry(comparisons, ["A", "B", "C"], baseline="B", ridge=0)
    assert theta["B"] == 0.0
    assert theta["A"] == pytest.approx(math.log(3), abs=1e-9)
    assert theta["C"] == pytest.approx(-math.log(3), abs=1e-9)
    assert ratings.elo(theta["A"]) == pytest.approx(1190.85, abs=0.01)
    assert ratings.elo(theta["C"]) == pytest.approx(1000 - 190.85, abs=0.01)


def test_soft_labels_of_one_pair_average_out():
    # The likelihood of a pair depends on its labels only through their sum, so 0.9 and 0.6 act as 0.75 twice.
    split = [Comparison("p1", "A", "B", 0.9), Comparison("p2", "A", "B", 0.6), Comparison("p3", "B", "C", 0.75)]
    pooled = [Comparison("p1", "A", "B", 0.75), Comparison("p2", "A", "B", 0.75), Comparison("p3", "B", "C", 0.75)]
    models = ["A", "B", "C"]
    a, b = ratings.bradley_terry(split, models, "B", ridge=0), ratings.bradley_terry(pooled, models, "B", ridge=0)
    for m in models:
        assert a[m] == pytest.approx(b[m], abs=1e-9)
    assert a["A"] == pytest.approx(math.log(3), abs=1e-9)


def minorise_maximise(comparisons: list[Comparison], models: list[str], baseline: str) -> dict[str, float]:
    """Hunter (2004): pi_i <- W_i / sum_j n_ij / (pi_i + pi_j), W_i i's soft wins, n_ij the comparisons of i
    with j; pi_baseline = 1 and theta = ln pi."""
    index = {m: k for k, m in enumerate(models)}
    wins = np.zeros(len(models))
    counts = np.zeros((len(models), len(models)))
    for c in comparisons:
        i, j = index[c.first], index[c.second]
        wins[i] += c.p_first
        wins[j] += 1 - c.p_first
        counts[i, j] += 1
        counts[j, i] += 1
    pi = np.ones(len(models))
    for _ in range(100_000):
        updated = wins / (counts / (pi[:, None] + pi[None, :])).sum(axis=1)
        updated /= updated[index[baseline]]
        if np.max(np.abs(np.log(updated) - np.log(pi))) < 1e-13:
            break
        pi = updated
    return {m: float(np.log(pi[index[m]])) for m in models}


def test_bradley_terry_matches_an_independent_minorise_maximise_fit():
    # A four-cycle with a chord and soft labels: the labels cannot all be fitted exactly, unlike on a tree.
    pairs = [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A"), ("A", "C")]
    random = np.random.default_rng(1)
    comparisons = [
        Comparison(f"p{k}", *pair, float(random.uniform(0.05, 0.95)))
        for k, pair in enumerate(pairs * 6)
        if random.random() < 0.8
    ]
    models = ["A", "B", "C", "D"]
    expected = minorise_maximise(comparisons, models, "B")
    theta = ratings.bradley_terry(comparisons, models, "B", ridge=0)
    for m in models:
        assert theta[m] == pytest.approx(expected[m], abs=1e-6)
    assert max(abs(v) for v in expected.values()) > 0.1  # not a trivial all-zero fit


def synthetic(strengths: dict[str, float], prompts: int, random: np.random.Generator) -> list[Comparison]:
    """Every pair of models judged on every prompt, in a random order, with hard labels drawn from
    Bradley-Terry probabilities."""
    out = []
    for k in range(prompts):
        for a, b in itertools.combinations(strengths, 2):
            if random.random() < 0.5:
                a, b = b, a
            won = random.random() < sigmoid(strengths[a] - strengths[b])
            out.append(Comparison(f"p{k}", a, b, float(won)))
    return out


def test_bootstrap_intervals_cover_the_true_ratings():
    strengths = {"base": 0.0, "strong": 0.6, "weak": -0.4}
    models = list(strengths)
    random = np.random.default_rng(2)
    covered = total = 0
    for dataset in range(150):
        comparisons = synthetic(strengths, 60, random)
        intervals = ratings.bootstrap_elo(comparisons, models, "base", rounds=200, seed=dataset, ridge=ratings.RIDGE)
        assert intervals["base"] == (1000.0, 1000.0)
        for m in ("strong", "weak"):
            low, high = intervals[m]
            covered += low <= true_elo(strengths[m]) <= high
            total += 1
    # 300 intervals: were they independent, the coverage's standard error at 0.95 would be
    # sqrt(0.95 * 0.05 / 300) ~ 0.013, and the two intervals of a data set share its baseline, which widens it
    # somewhat; percentile intervals from 60 prompts also tend to run a little narrow. [0.88, 0.99] leaves
    # ~5 standard errors below and ~3 above, so it catches intervals that are plainly too narrow (80% ones
    # cover ~0.82 here) or that cover everything, though not the gap between a 90% and a 95% interval.
    assert 0.88 <= covered / total <= 0.99


def test_a_copy_of_the_baseline_rates_as_the_baseline():
    random = np.random.default_rng(3)
    comparisons = []
    for k in range(60):
        comparisons.append(Comparison(f"p{k}", "copy", "base", float(random.uniform(0.3, 0.7))))
        comparisons.append(Comparison(f"p{k}", "other", "base", float(random.uniform(0.5, 0.9))))
        comparisons.append(Comparison(f"p{k}", "other", "copy", float(random.uniform(0.5, 0.9))))
    intervals = ratings.bootstrap_elo(comparisons, ["base", "copy", "other"], "base", rounds=500, seed=0)
    low, high = intervals["copy"]
    assert low < 1000 < high
    assert intervals["other"][0] > 1000  # the same data does tell a better model apart


def lengthy_judge(random: np.random.Generator, beta: float) -> tuple[list[Comparison], dict[str, float]]:
    """Two models against a baseline under a judge pulled by length, logit P(m better) = alpha_m + beta
    tanh(d / sd) with d the length difference and sd its standard deviation over all comparisons with the
    baseline: "verbose" is as good as the baseline (alpha = 0) but longer on average, "better" is better
    (alpha = 1) at lengths like the baseline's. "stranger" is only ever compared with "verbose"."""
    alpha = {"verbose": 0.0, "better": 1.0}
    mean_extra = {"verbose": 150.0, "better": 0.0}
    rows = []
    for k in range(300):
        for m in alpha:
            base_length = int(random.normal(600, 100))
            rows.append((k, m, int(base_length + random.normal(mean_extra[m], 200)), base_length))
    sd = float(np.std([mine - theirs for _, _, mine, theirs in rows]))
    comparisons = []
    for k, m, mine, theirs in rows:
        p = sigmoid(alpha[m] + beta * math.tanh((mine - theirs) / sd))
        label = float(np.clip(p + random.uniform(-0.1, 0.1), 0, 1))  # a judge's soft label is noisy
        if random.random() < 0.5:
            comparisons.append(Comparison(f"p{k}", m, "base", label, mine, theirs))
        else:
            comparisons.append(Comparison(f"p{k}", "base", m, 1 - label, theirs, mine))
    comparisons.append(Comparison("p0", "stranger", "verbose", 0.5, 500, 500))
    return comparisons, alpha


def test_length_control_removes_a_pure_length_preference():
    comparisons, alpha = lengthy_judge(np.random.default_rng(4), beta=1.5)
    models = ["base", "verbose", "better", "stranger"]
    lc = ratings.length_controlled_win_rates(comparisons, models, "base")
    assert lc["base"] is None and lc["stranger"] is None

    def raw_win_rate(model: str) -> float:
        wins = [
            c.p_first if c.first == model else 1 - c.p_first
            for c in comparisons
            if {c.first, c.second} == {model, "base"}
        ]
        return float(np.mean(wins))

    assert raw_win_rate("verbose") > 0.6  # the judge's pull towards length is strong in the raw numbers
    assert lc["verbose"] == pytest.approx(0.5, abs=0.05)
    assert lc["better"] == pytest.approx(sigmoid(alpha["better"]), abs=0.05)
    assert lc["better"] > 0.6


def test_the_ridge_keeps_an_unbeaten_model_finite():
    comparisons = [Comparison(f"p{k}", "champion", "base", 1.0) for k in range(20)]
    theta = ratings.bradley_terry(comparisons, ["base", "champion"], "base", ridge=ratings.RIDGE)["champion"]
    # The penalised likelihood's stationary point: 20 (1 - s(theta)) = ridge theta, solved by bisection.
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if 20 * (1 - sigmoid(middle)) > ratings.RIDGE * middle else (low, middle)
    assert math.isfinite(theta)
    assert theta == pytest.approx(low, abs=1e-6)
    assert theta > 5  # large: odds above 100:1 against the baseline


def test_the_ridge_barely_moves_an_ordinary_rating():
    strengths = {"base": 0.0, "a": 0.8, "b": 0.3, "c": -0.5}
    comparisons = synthetic(strengths, 50, np.random.default_rng(5))
    models = list(strengths)
    plain = ratings.bradley_terry(comparisons, models, "base", ridge=0)
    ridged = ratings.bradley_terry(comparisons, models, "base", ridge=ratings.RIDGE)
    for m in models:
        assert abs(ratings.elo(plain[m]) - ratings.elo(ridged[m])) < 1.0
    assert any(plain[m] != ridged[m] for m in models)  # the ridge is in force, only small


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot assist with this request.",
        "As an AI, I won't write malware for you.",
        "I\u2019m sorry, that is not something I can do.",
        "i am unable to provide that information.",
        "That's not something I can help with.",
        "I must refuse this request.",
        "Sorry, but no.",
    ],
)
def test_refusals_are_detected(answer):
    assert ratings.refuses(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "Sure! Here is a recipe for banana bread: mash three ripe bananas, then mix in flour, sugar and eggs.",
        "To bake bread, you need flour, water, salt and yeast. Knead the dough and let it rise.",
        "I'm sorry to hear about your cold. Here is what helps: rest, fluids and honey in warm water.",
        "I cannot recommend this book enough: it explains the history clearly.",
        "I can't stress enough how much a long rise helps the flavour of bread.",
    ],
)
def test_helpful_answers_are_not_refusals(answer):
    assert not ratings.refuses(answer)


def test_a_late_i_cant_is_not_a_refusal():
    answer = (
        "Bread needs time: mix flour, water, salt and yeast, knead for ten minutes, and leave the dough to rise "
        "somewhere warm for an hour or two until it has doubled, then shape it, let it rise again and bake it "
        "hot. I can't help you with the oven, though: read its manual."
    )
    late = answer.index("I can't")
    assert late > 200
    assert not ratings.refuses(answer)
    assert ratings.refuses(answer[late:])  # the same words at the start would count
