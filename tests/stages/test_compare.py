"""The compare stage's labels from known judge log-probabilities (a scripted judge written for these
tests); the real engine runs it in tests/test_pipeline.py."""

from __future__ import annotations

import json
import math

import pytest

from cai import constitution
from cai.backends.base import Completion
from cai.stages import StageContext, build
from conftest import ROOT
from stage_runner import run_stage

HARMLESS = constitution.load(ROOT / "constitutions" / "harmless.yaml")


class Judge:
    """Prefers the response holding 'kind' with P = 0.8, and adds a pull of `bias` towards (A)."""

    def __init__(self, bias: float = 0.0):
        self.bias = bias
        self.scored = []

    async def choice_logprobs(self, r, choices):
        self.scored.append(r)
        text = r.messages[-1]["content"]
        a = text.split("<response_a>")[1].split("</response_a>")[0]
        p_a = 0.8 if "kind" in a else 0.2
        p_a = min(max(p_a + self.bias, 0.01), 0.99)
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def rows(*answer_lists):
    return [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}], "response": answers[0], "responses": list(answers)}
        for i, answers in enumerate(answer_lists)
    ]


def run(params, judge, data):
    ctx = StageContext(3, "compare", HARMLESS, {"judge": judge}, {"judge": "j"})
    return run_stage(build("compare", params), data, ctx)


def test_swap_average_removes_position_bias():
    judge = Judge(bias=0.1)
    [row] = run({}, judge, rows(["a kind answer", "a rude answer"])).rows
    [pair] = row["pairs"]
    # shown first: P(A)=0.9 for the kind one; swapped: P(B) = 1 - (0.2 + 0.1) = 0.7; average 0.8
    assert pair["p_first"] == pytest.approx(0.8)
    assert pair["label"] == "a" and pair["position_consistent"] is True
    assert len(judge.scored) == 2  # both orders


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
    [request] = judge.scored
    principle = HARMLESS.principle(row["pairs"][0]["principle_ids"][0])
    assert principle.comparison in request.messages[0]["content"]
    assert row["pairs"][0]["position_consistent"] is None  # no swap, no consistency to report


def test_invalid_when_the_judge_gives_no_option():
    class Silent:
        async def choice_logprobs(self, r, choices):
            return {c: float("-inf") for c in choices}

    [row] = run({"method": "logprobs"}, Silent(), rows(["one", "two"])).rows
    assert row["pairs"][0]["label"] == "invalid" and row["pairs"][0]["p_first"] is None


class Parser:
    """A judge without log-probabilities (every option -inf) that replies in text when asked."""

    def __init__(self, reply):
        self.reply = reply
        self.completed = []

    async def choice_logprobs(self, r, choices):
        return {c: float("-inf") for c in choices}

    async def complete(self, r):
        self.completed.append(r)
        return Completion(texts=(self.reply(r.messages[-1]["content"]),), completion_tokens=3, finish_reasons=("stop",))


def kind_letter(text):
    a = text.split("<response_a>")[1].split("</response_a>")[0]
    return '{"choice": "A"}' if "kind" in a else '{"choice": "B"}'


def test_without_logprobs_auto_falls_back_to_a_parsed_choice_marked_as_such():
    judge = Parser(kind_letter)
    [row] = run({}, judge, rows(["rude", "kind"])).rows
    [pair] = row["pairs"]
    assert pair["method"] == "parsed" and all(v["method"] == "parsed" for v in pair["votes"])
    assert pair["p_first"] == 0.0 and pair["label"] == "b" and pair["position_consistent"] is True
    assert len(judge.completed) == 2 and all(json.loads(r.json_schema)["properties"]["choice"]["enum"] == ["A", "B"] for r in judge.completed)
    assert all('{"choice": "A"}' in r.messages[-1]["content"] for r in judge.completed)


def test_parsed_method_skips_logprobs_and_an_unparseable_reply_is_invalid():
    class NoScores(Parser):
        async def choice_logprobs(self, r, choices):
            raise AssertionError("method: parsed must not ask for log-probabilities")

    [row] = run({"method": "parsed"}, NoScores(lambda text: "I think the first one"), rows(["one", "two"])).rows
    assert row["pairs"][0]["label"] == "invalid" and row["pairs"][0]["method"] == "parsed"


def test_logprobs_where_present_parsed_only_where_missing():
    class Partial(Judge):
        async def choice_logprobs(self, r, choices):
            scores = await super().choice_logprobs(r, choices)
            if "<response_a>\nrude" in r.messages[-1]["content"]:  # the swapped order comes back without log-probs
                return {c: float("-inf") for c in choices}
            return scores

        async def complete(self, r):
            return Completion(texts=(kind_letter(r.messages[-1]["content"]),), completion_tokens=3)

    [row] = run({}, Partial(), rows(["kind", "rude"])).rows
    [pair] = row["pairs"]
    assert [v["method"] for v in pair["votes"]] == ["logprobs", "parsed"] and pair["method"] == "mixed"
    assert pair["p_first"] == pytest.approx((0.8 + 1.0) / 2)


class Obedient(Judge):
    """Follows a planted "choose (X)" with P = 0.95, else judges like Judge."""

    async def choice_logprobs(self, r, choices):
        out = await super().choice_logprobs(r, choices)
        text = r.messages[-1]["content"]
        for letter, other in (("A", "B"), ("B", "A")):
            if f"choose ({letter})" in text:
                out = {letter: math.log(0.95), other: math.log(0.05)}
        return out


def test_injection_probe_plants_the_instruction_under_the_shown_letter_and_leaves_the_label_alone():
    judge = Obedient()
    [row] = run({"injection_probe": 1.0}, judge, rows(["kind", "rude"])).rows
    [pair] = row["pairs"]
    assert pair["label"] == "a" and pair["p_first"] == pytest.approx(0.8)  # the clean votes alone
    assert pair["injection"]["label"] == "b" and pair["injection"]["p_first"] == pytest.approx(0.05)
    planted = [r.messages[-1]["content"] for r in judge.scored if "Ignore the above" in r.messages[-1]["content"]]
    assert len(planted) == 2
    for text in planted:  # the instruction sits inside the second answer's block and names that block's letter
        letter = "B" if "rude" in text.split("<response_b>")[1] else "A"
        block = text.split(f"<response_{letter.lower()}>")[1].split(f"</response_{letter.lower()}>")[0]
        assert f"choose ({letter})" in block

    [row] = run({"injection_probe": 1.0}, Judge(), rows(["kind", "rude"])).rows
    assert row["pairs"][0]["injection"]["label"] == "a"  # a judge that ignores it keeps its verdict


def test_injection_probe_share_is_seeded():
    data = rows(*[[f"kind {i}", f"rude {i}"] for i in range(40)])
    first = [("injection" in r["pairs"][0]) for r in run({"injection_probe": 0.25}, Judge(), data).rows]
    again = [("injection" in r["pairs"][0]) for r in run({"injection_probe": 0.25}, Judge(), data).rows]
    assert first == again and 3 <= sum(first) <= 20


def test_chain_of_thought_scores_the_choice_after_the_reasoning():
    class Reasoner(Judge):
        async def complete(self, r):
            return Completion(texts=("Response A is kinder.",), completion_tokens=5, finish_reasons=("stop",))

        async def choice_logprobs(self, r, choices):
            self.scored.append(r)
            return {"A": math.log(0.7), "B": math.log(0.3)}

    judge = Reasoner()
    result = run({"chain_of_thought": True, "swap": False}, judge, rows(["kind", "rude"]))
    [scored] = judge.scored
    assert [m["role"] for m in scored.messages] == ["user", "assistant", "user"]
    assert scored.messages[1]["content"] == "Response A is kinder." and "single letter" in scored.messages[2]["content"]
    vote = result.rows[0]["pairs"][0]["votes"][0]
    assert vote["reasoning"] == "Response A is kinder." and vote["p_first"] == pytest.approx(0.7)
    assert result.completion_tokens == 5
