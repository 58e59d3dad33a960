"""Judge calibration maths (fit, ECE, the letter frame), length figures, and the calibration file a
pipeline names, against hand-computed values; the real engine runs it in tests/judge/test_eval_judge.py."""

from __future__ import annotations

import json
import math
import random

import pytest
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate import calibration
from cai.generate.calibration import Calibration, expected_calibration_error, fit, letter_log_odds, nll, reliability
from cai.generate.config import load
from cai.generate.pipeline import fingerprint
from cai.judge.eval_judge import length_figures


def draw(temperature: float, offset: float, n: int, seed: int) -> tuple[list[float], list[float]]:
    """Votes from the model itself: log-odds z ~ N(0, 4^2), label A-better ~ Bernoulli(sigmoid((z - b) / T))."""
    r = random.Random(seed)
    z = [r.gauss(0, 4) for _ in range(n)]
    y = [1.0 if r.random() < calibration.sigmoid((zi - offset) / temperature) else 0.0 for zi in z]
    return z, y


@pytest.mark.parametrize("temperature, offset", [(2.0, 1.5), (0.5, -2.0)])
def test_fit_recovers_the_temperature_and_offset_votes_were_drawn_with(temperature, offset):
    z, y = draw(temperature, offset, 20000, seed=0)
    fitted = fit(z, y)
    assert fitted.temperature == pytest.approx(temperature, rel=0.1)
    assert fitted.position_offset == pytest.approx(offset, abs=0.15)
    # the fit minimises the NLL: no worse than the true parameters, better than the raw judge
    assert nll(z, y, fitted) <= nll(z, y, Calibration(temperature, offset)) < nll(z, y)


def test_the_calibrated_vote_is_computed_in_the_letter_frame():
    cal = Calibration(temperature=2.0, position_offset=1.0)
    # first answer shown as (A) with P(A) = 0.8: z = ln 4 = 1.3863, P_cal(A) = sigmoid(0.3863 / 2) = 0.548137
    assert cal.p_first(0.8, swapped=False) == pytest.approx(0.548137, abs=1e-6)
    # first answer shown as (B) with P(B) = 0.8: P(A) = 0.2, z = -1.3863, sigmoid(-2.3863 / 2) = 0.232697
    assert cal.p_first(0.8, swapped=True) == pytest.approx(1 - 0.232697, abs=1e-6)
    assert letter_log_odds(0.8, True) == pytest.approx(-math.log(4))
    # B given no probability at all: p = 1 is capped at z = 30, not infinite
    assert letter_log_odds(1.0, False) == calibration.LOGIT_CAP and cal.p_first(1.0, False) == pytest.approx(
        0.9999995, abs=1e-7
    )


def test_a_vote_record_keeps_the_judges_own_probability_and_parsed_votes_stay():
    cal = Calibration(temperature=2.0, position_offset=1.0)
    vote = {"principle_id": "x", "swapped": True, "p_first": 0.8, "method": "logprobs"}
    out = cal.vote(vote)
    assert out["p_first_raw"] == 0.8 and out["p_first"] == pytest.approx(0.767303, abs=1e-6)
    assert cal.vote(out) == out  # calibrating again starts from the raw probability
    assert calibration.uncalibrated(out) == vote and calibration.uncalibrated(vote) is vote
    parsed = {"principle_id": "x", "swapped": False, "p_first": 1.0, "method": "parsed"}
    none = {"principle_id": "x", "swapped": False, "p_first": None, "method": "logprobs"}
    assert cal.vote(parsed) is parsed and cal.vote(none) is none


def test_an_always_a_judge_is_calibrated_to_a_coin_flip_without_blowing_up():
    # SmolLM2 on HH pairs: a large P(A) whichever answer is shown first, so every pair has one vote
    # labelled A-better and one B-better (the two orders) at the same log-odds.
    r = random.Random(1)
    z, y = [], []
    for _ in range(200):
        zi = min(r.gauss(12, 3), calibration.LOGIT_CAP)
        z += [zi, zi]
        y += [1.0, 0.0]
    fitted = fit(z, y)
    assert math.isfinite(fitted.temperature) and math.isfinite(fitted.position_offset)
    assert fitted.temperature <= 1 / calibration.MIN_SLOPE
    assert all(fitted.p_a(zi) == pytest.approx(0.5, abs=0.01) for zi in z)
    assert nll(z, y, fitted) == pytest.approx(math.log(2), abs=1e-3)
    # raw: the A-better vote costs log(1 + e^-z) ~ 0, the B-better one log(1 + e^z) ~ z
    assert nll(z, y) == pytest.approx(sum(z) / len(z) / 2, rel=1e-3)
    # every vote at the cap (B never has any probability): the same, at the cap
    stuck = fit([calibration.LOGIT_CAP] * 10, [1.0, 0.0] * 5)
    assert stuck.p_a(calibration.LOGIT_CAP) == pytest.approx(0.5, abs=1e-3)


def test_ece_by_hand():
    # P(first better), the first answer being the right one: confidence max(p, 1 - p), right when p > 0.5
    bins = reliability([0.93, 0.81, 0.28, 0.5, 0.62], bins=2)
    # [0.5, 0.75): confidences 0.72, 0.5, 0.62 (mean 0.61333), right 0, 0.5, 1 (mean 0.5)
    # [0.75, 1]:   confidences 0.93, 0.81 (mean 0.87), right 1, 1
    assert [b["n"] for b in bins] == [3, 2]
    assert bins[0]["confidence"] == pytest.approx(0.613333, abs=1e-6) and bins[0]["accuracy"] == pytest.approx(0.5)
    # ECE = 3/5 * |0.5 - 0.61333| + 2/5 * |1 - 0.87| = 0.068 + 0.052
    assert expected_calibration_error(bins) == pytest.approx(0.12)
    assert [b["n"] for b in reliability([0.75, 0.25, 1.0, 0.0], bins=2)] == [0, 4]  # edges go up; 1.0 in the last bin
    ten = reliability([0.5, 0.5, 0.97], bins=10)
    assert ten[0]["n"] == 2 and ten[9]["n"] == 1 and ten[5]["accuracy"] is None
    assert expected_calibration_error(ten) == pytest.approx(1 / 3 * 0.03)
    assert expected_calibration_error(reliability([])) is None


def test_length_win_rates_by_hand():
    judged = [
        (0.9, 10, 5),  # chosen longer, judge picks it: the longer wins
        (0.2, 10, 5),  # chosen longer, judge picks the shorter rejected one
        (0.7, 3, 8),  # chosen shorter, judge picks it: the shorter wins
        (0.4, 3, 8),  # chosen shorter, judge picks the longer rejected one
        (0.5, 4, 9),  # a tie: half a win for the longer
        (0.9, 6, 6),  # equal lengths: left out
        (0.1, 2, 7),  # chosen shorter, judge picks the longer rejected one
    ]
    out = length_figures(judged)
    assert out["length_n"] == 6
    assert out["length_win_rate"] == pytest.approx(3.5 / 6)
    assert out["human_length_win_rate"] == pytest.approx(2 / 6)
    # people chose the longer: judge's longer-wins 1, 0 -> 0.5; the shorter: 0, 1, 0.5, 1 -> 0.625
    assert out["length_win_rate_balanced"] == pytest.approx((0.5 + 0.625) / 2)
    low, high = out["length_win_rate_ci95"]
    assert low < out["length_win_rate"] < high
    assert length_figures([(0.9, 10, 5)])["length_win_rate_balanced"] is None  # no pair where people chose the shorter


def compare_pipeline(tmp_path, calibration_file: str) -> object:
    return tiny_pipeline(
        tmp_path,
        tmp_path / "no-model",
        roles={"responder": "local", "judge": "local"},
        stages=[{"type": "respond"}, {"type": "compare", "calibration": calibration_file}],
    )


def write(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_a_pipeline_reads_its_calibration_relative_to_itself_and_its_content_is_in_the_fingerprint(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path.parent)  # not the pipeline's folder: the path is found beside the pipeline
    (tmp_path / "no-model").mkdir()
    write(tmp_path / "cal.json", {"temperature": 2.0, "position_offset": 1.0, "fitted_on": {"n": 3}})
    seen = []  # a server confines every path a pipeline names to its workspace, this one too
    config = load(compare_pipeline(tmp_path, "cal.json"), check_path=lambda path, field: seen.append((path, field)))
    assert (tmp_path / "cal.json", "stages[1].calibration") in seen
    cal = config.stages[1].params["calibration"]
    assert (cal.temperature, cal.position_offset) == (2.0, 1.0) and len(cal.sha256) == 64
    before = fingerprint(config)
    write(tmp_path / "cal.json", {"temperature": 3.0, "position_offset": 1.0})
    assert fingerprint(load(config.file)) != before  # same path, other calibration: another run


@pytest.mark.parametrize(
    "doc, error",
    [
        ({"temperature": -1, "position_offset": 0}, "temperature: must be greater than 0, got -1"),
        ({"temperature": 1, "position_offset": "x"}, "position_offset: expected number, got string"),
        ({"temperature": 1}, "<root>: 'position_offset' is required"),
        ({"temperature": 1, "position_offset": 0, "temprature": 2}, "<root>: unknown key 'temprature'"),
    ],
)
def test_a_bad_calibration_file_exits_2_naming_the_file_and_field(tmp_path, capsys, doc, error):
    (tmp_path / "no-model").mkdir()
    cal = write(tmp_path / "cal.json", doc)
    assert main(["validate", str(compare_pipeline(tmp_path, "cal.json"))]) == 2
    assert capsys.readouterr().err.strip().startswith(f"{cal}: {error}")


def test_a_missing_calibration_file_names_the_pipeline_field(tmp_path, capsys):
    (tmp_path / "no-model").mkdir()
    pipeline = compare_pipeline(tmp_path, "missing.json")
    assert main(["validate", str(pipeline)]) == 2
    assert capsys.readouterr().err.strip() == f"{pipeline}: stages[1].calibration: file not found: missing.json"
