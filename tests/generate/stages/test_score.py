"""d-RLAIF scores from known judge log-probabilities (a scripted judge written for this test)."""

from __future__ import annotations

import math

import pytest
from locations import ROOT
from stage_runner import run_stage

from cai.generate import constitution
from cai.generate.stages import StageContext, build

HARMLESS = constitution.load(ROOT / "constitutions" / "harmless.yaml")


class Judge:
    """Puts probability 0.5 on 8 and 0.5 on 10 for answers holding 'kind', else all on 2."""

    def __init__(self):
        self.requests = []

    async def choice_logprobs(self, r, choices):
        self.requests.append(r)
        answer = r.messages[0]["content"].split("<response>")[1]
        probs = {"8": 0.5, "10": 0.5} if "kind" in answer else {"2": 1.0}
        return {c: math.log(probs[c]) if c in probs else float("-inf") for c in choices}


def test_scores_are_expectations_per_answer():
    rows = [
        {
            "id": "r0",
            "messages": [{"role": "user", "content": "q"}],
            "response": "kind",
            "responses": ["kind words", "rude words"],
        }
    ]
    judge = Judge()
    ctx = StageContext(1, "score", HARMLESS, {"judge": judge}, {"judge": "j"})
    [row] = run_stage(build("score", {"ensemble": 2}), rows, ctx).rows
    assert [s["score"] for s in row["scores"]] == [pytest.approx(9.0), pytest.approx(2.0)]
    assert all(len(s["principle_scores"]) == 2 for s in row["scores"])
    assert len(judge.requests) == 4  # 2 answers x 2 principles
    assert "Reply with a single number from 1 to 10." in judge.requests[0].messages[0]["content"]
