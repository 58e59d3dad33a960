"""Critique-revision logic: prompts sent to the roles, principle draws, flags, failures.

The backend here is a deterministic stand-in written for these tests (it answers from the request
itself), so the assertions can name exact texts; the real engine is exercised in tests/generate/test_pipeline.py.
"""

from __future__ import annotations

from locations import ROOT
from stage_runner import run_stage

from cai.core.seeding import rng
from cai.generate import constitution
from cai.generate.backends.base import ChatRequest, Completion
from cai.generate.stages import StageContext, build
from cai.generate.stages.critique_revise import revision_flags

HARMLESS = constitution.load(ROOT / "constitutions" / "harmless.yaml")


class ScriptedBackend:
    """Critiques are 'critique of <answer>'; revisions 'revised <answer>'; a prompt containing FAIL errors."""

    def __init__(self):
        self.sent: list[ChatRequest] = []

    async def complete(self, r):
        self.sent.append(r)
        last = r.messages[-1]["content"]
        answer = next(m["content"] for m in reversed(r.messages) if m["role"] == "assistant")
        if any("FAIL" in m["content"] for m in r.messages):
            return Completion(error="scripted failure")
        if any(last == p.critique for p in HARMLESS.principles):
            return Completion(texts=(f"critique of {answer}",), completion_tokens=3, finish_reasons=("stop",))
        prior = r.messages[-4]["content"]  # the answer being revised
        return Completion(texts=(f"revised {prior}",), completion_tokens=2, finish_reasons=("stop",))


def rows(*texts):
    return [
        {"id": f"row{i}", "messages": [{"role": "user", "content": t}], "response": f"answer {i}"}
        for i, t in enumerate(texts)
    ]


def context(backend, seed=11):
    return StageContext(
        seed, "critique_revise", HARMLESS, {"critic": backend, "reviser": backend}, {"critic": "m", "reviser": "m"}
    )


def test_rounds_chain_revisions_each_row_on_its_own():
    backend = ScriptedBackend()
    result = run_stage(build("critique_revise", {"rounds": 2}), rows("q0", "q1", "q2"), context(backend))
    assert len(backend.sent) == 3 * 4  # per row: critique, revision, critique, revision
    mine = [r for r in backend.sent if r.messages[0]["content"] == "q0"]
    kinds = [
        "critique" if r.messages[-1]["content"] in {p.critique for p in HARMLESS.principles} else "revision"
        for r in mine
    ]
    assert kinds == ["critique", "revision", "critique", "revision"]  # a row's calls follow each other in order
    row = result.rows[0]
    assert [r["revision"] for r in row["rounds"]] == ["revised answer 0", "revised revised answer 0"]
    assert row["rounds"][1]["critique"] == "critique of revised answer 0"
    assert row["revision"] == "revised revised answer 0" and row["flags"] == []
    assert result.completion_tokens == 3 * 2 * (3 + 2)


def test_principles_drawn_from_row_seed():
    backend = ScriptedBackend()
    result = run_stage(build("critique_revise", {"rounds": 2}), rows("q0", "q1"), context(backend, seed=5))
    for row in result.rows:
        expected = [HARMLESS.draw(rng(5, row["id"], "critique_revise", r)).id for r in range(2)]
        assert row["principle_ids"] == expected
    critique_request = backend.sent[0]
    principle = HARMLESS.principle(result.rows[0]["principle_ids"][0])
    assert critique_request.messages[-1]["content"] == principle.critique
    revision_request = next(
        r for r in backend.sent if r.messages[-1]["content"] == principle.revision and "answer 0" in str(r.messages)
    )
    assert revision_request.messages[-1]["content"] == principle.revision


def test_few_shot_dialogues_lead_the_context():
    backend = ScriptedBackend()
    run_stage(build("critique_revise", {"few_shot": 1}), rows("q0"), context(backend))
    sent = backend.sent[0].messages
    assert list(sent[: len(HARMLESS.few_shot[0])]) == list(HARMLESS.few_shot[0])
    assert sent[len(HARMLESS.few_shot[0])] == {"role": "user", "content": "q0"}


def test_a_failed_call_fails_only_its_row():
    result = run_stage(build("critique_revise", {}), rows("ok", "FAIL please", "fine"), context(ScriptedBackend()))
    assert [r["id"] for r in result.rows] == ["row0", "row2"]
    assert result.failures == [{"id": "row1", "reason": "critic (round 1): scripted failure"}]


def test_revision_flags():
    assert revision_flags("   ", "the critique") == ["empty_revision"]
    critique = "The answer explains how to make a weapon, which is dangerous."
    assert revision_flags(critique, critique) == ["revision_repeats_critique"]
    assert revision_flags("the answer explains how to make a weapon which is dangerous", critique) == [
        "revision_repeats_critique"
    ]
    assert revision_flags("I can't help with weapons, but here is how to stay safe.", critique) == []
