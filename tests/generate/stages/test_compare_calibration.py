"""The compare stage with a judge calibration: each vote calibrated in the letter frame before the swap
average, from known judge log-probabilities (a scripted judge)."""

from __future__ import annotations

import math

import pytest
from locations import ROOT
from stage_runner import run_stage

from cai.generate import constitution
from cai.generate.calibration import Calibration
from cai.generate.stages import StageContext
from cai.generate.stages.compare import Compare

HARMLESS = constitution.load(ROOT / "constitutions" / "harmless.yaml")


class Judge:
    """P(A) = 0.8 when the answer shown as (A) holds 'kind', else 0.2, plus 0.1 towards (A)."""

    async def choice_logprobs(self, r, choices):
        a = r.messages[-1]["content"].split("<response_a>")[1].split("</response_a>")[0]
        p_a = (0.8 if "kind" in a else 0.2) + 0.1
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def judge(stage: Compare) -> dict:
    ctx = StageContext(3, "compare", HARMLESS, {"judge": Judge()}, {"judge": "j"})
    row = {
        "id": "r0",
        "messages": [{"role": "user", "content": "q"}],
        "response": "a kind answer",
        "responses": ["a kind answer", "a rude answer"],
    }
    [out] = run_stage(stage, [row], ctx).rows
    [pair] = out["pairs"]
    return pair


def test_votes_are_calibrated_before_the_swap_average_and_the_pair_says_so():
    pair = judge(Compare(calibration=Calibration(temperature=2.0, position_offset=1.0, sha256="ab" * 32)))
    by_order = {v["swapped"]: v for v in pair["votes"]}
    # kind shown as (A): P(A) = 0.9, z = ln 9 = 2.19722; sigmoid((2.19722 - 1) / 2) = 0.645339
    assert by_order[False]["p_first_raw"] == pytest.approx(0.9) and by_order[False]["p_first"] == pytest.approx(
        0.645339, abs=1e-6
    )
    # kind shown as (B): P(A) = 0.3, z = ln(3/7) = -0.847298; 1 - sigmoid((-0.847298 - 1) / 2) = 0.715785
    assert by_order[True]["p_first_raw"] == pytest.approx(0.7) and by_order[True]["p_first"] == pytest.approx(
        0.715785, abs=1e-6
    )
    assert pair["p_first"] == pytest.approx((0.645339 + 0.715785) / 2, abs=1e-6)
    assert pair["calibration"] == "ab" * 32 and pair["label"] == "a"


def test_without_a_calibration_votes_are_the_judges_own():
    pair = judge(Compare())
    assert pair["p_first"] == pytest.approx(0.8) and "calibration" not in pair
    assert all("p_first_raw" not in v for v in pair["votes"])
