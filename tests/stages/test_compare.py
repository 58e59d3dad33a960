"""The compare stage's labels from known judge log-probabilities (a scripted judge written for these
tests); the real engine runs it in tests/test_pipeline.py."""

from __future__ import annotations

import math

import pytest

from cai import constitution
from cai.stages import StageContext, build
from conftest import ROOT

HARMLESS = constitution.load(ROOT / "constitutions" / "harmless.yaml")


class Judge:
    """Prefers the response holding 'kind' with P = 0.8, and adds a pull of `bias` towards (A)."""

    def __init__(self, bias: float = 0.0):
        self.bias = bias
        self.batches = []

    def choice_logprobs(self, requests, choices):
        self.batches.append(list(requests))
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            a = text.split("<response_a>")[1].split("</response_a>")[0]
            p_a = 0.8 if "kind" in a else 0.2
            p_a = min(max(p_a + self.bias, 0.01), 0.99)
            out.append({"A": math.log(p_a), "B": math.log(1 - p_a)})
        return out


def rows(*answer_lists):
    return [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}], "response": answers[0], "responses": list(answers)}
        for i, answers in enumerate(answer_lists)
    ]


def run(params, judge, data):
    ctx = StageContext(3, "compare", HARMLESS, {"judge": judge}, {"judge": "j"})
    return build("compare", params).run(data, ctx)


def test_swap_average_removes_position_bias():
    judge = Judge(bias=0.1)
    [row] = run({}, judge, rows(["a kind answer", "a rude answer"])).rows
    [pair] = row["pairs"]
    # shown first: P(A)=0.9 for the kind one; swapped: P(B) = 1 - (0.2 + 0.1) = 0.7; average 0.8
    assert pair["p_first"] == pytest.approx(0.8)
    assert pair["label"] == "a" and pair["position_consistent"] is True
    assert len(judge.batches) == 1 and len(judge.batches[0]) == 2  # both orders in one batch


def test_position_bias_alone_gives_a_tie_and_inconsistency():
    judge = Judge(bias=0.3)
    [row] = run({"tie_threshold": 0.05}, judge, rows(["plain one", "plain two"])).rows
    [pair] = row["pairs"]
    # both orders: P(A) = 0.5 -> first shown first 0.5, first shown second 1 - 0.5: p = 0.5
    assert pair["label"] == "tie" and pair["p_first"] == pytest.approx(0.5)


def test_k_answers_make_k_choose_2_pairs_in_a_group_and_skip_equal_answers():
    [row] = run({"ensemble": 3}, Judge(), rows(["kind a", "rude b", "kind a", "rude c"])).rows
    assert [p["answers"] for p in row["pairs"]] == [[0, 1], [0, 3], [1, 2], [1, 3], [2, 3]]  # (0, 2) are equal
    assert row["group_id"] == "r0"
    assert all(len(p["principle_ids"]) == 3 == len(set(p["principle_ids"])) for p in row["pairs"])
    labels = {tuple(p["answers"]): p["label"] for p in row["pairs"]}
    assert labels[(0, 1)] == "a" and labels[(1, 2)] == "b" and labels[(1, 3)] == "tie"


def test_principles_are_comparison_questions_in_the_prompt():
    judge = Judge()
    [row] = run({"swap": False}, judge, rows(["kind", "rude"])).rows
    [request] = judge.batches[0]
    principle = HARMLESS.principle(row["pairs"][0]["principle_ids"][0])
    assert principle.comparison in request.messages[0]["content"]
    assert row["pairs"][0]["position_consistent"] is None  # no swap, no consistency to report


def test_invalid_when_the_judge_gives_no_option():
    class Silent:
        def choice_logprobs(self, requests, choices):
            return [{c: float("-inf") for c in choices} for _ in requests]

    [row] = run({}, Silent(), rows(["one", "two"])).rows
    assert row["pairs"][0]["label"] == "invalid" and row["pairs"][0]["p_first"] is None


def test_chain_of_thought_scores_the_choice_after_the_reasoning():
    from cai.backends.base import Completion

    class Reasoner(Judge):
        def complete(self, requests, on_done=None):
            return [Completion(texts=("Response A is kinder.",), completion_tokens=5, finish_reasons=("stop",)) for _ in requests]

        def choice_logprobs(self, requests, choices):
            self.batches.append(list(requests))
            return [{"A": math.log(0.7), "B": math.log(0.3)} for _ in requests]

    judge = Reasoner()
    result = run({"chain_of_thought": True, "swap": False}, judge, rows(["kind", "rude"]))
    [scored] = judge.batches[0]
    assert [m["role"] for m in scored.messages] == ["user", "assistant", "user"]
    assert scored.messages[1]["content"] == "Response A is kinder." and "single letter" in scored.messages[2]["content"]
    vote = result.rows[0]["pairs"][0]["votes"][0]
    assert vote["reasoning"] == "Response A is kinder." and vote["p_first"] == pytest.approx(0.7)
    assert result.completion_tokens == 5
