"""The compare stage's labels from known judge log-probabilities (a scripted judge written for these
tests); the real engine runs it in tests/generate/test_pipeline.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from locations import ROOT
from stage_runner import run_stage

from cai.generate import constitution
from cai.generate.backends.base import Completion
from cai.generate.constitution import ComparisonShot
from cai.generate.stages import StageContext, build
from cai.generate.stages.compare import ANSWER_INSTRUCTION, COT_INSTRUCTION, JUDGE_TEMPLATE, PARSED_INSTRUCTION

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
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "response": answers[0],
            "responses": list(answers),
        }
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


def test_initial_vs_revision_after_several_samples_points_at_the_revision_the_export_reads():
    """Samples and a revision in one row: the pair's indexes point into `row_answers`, the one list every
    reader (export, run statistics, report) takes a pair's answers from."""
    from cai.generate.export import preference_records
    from cai.generate.records import row_answers

    [data] = rows(["a rude first sample", "another rude sample"])
    data.update(revision="a kind revision", constitution_hash="h", seed=3, pipeline="p")
    [row] = run({"pairing": "initial_vs_revision"}, Judge(), [data]).rows
    [pair] = row["pairs"]
    first, second = (row_answers(row)[i] for i in pair["answers"])
    assert (first, second) == ("a rude first sample", "a kind revision") and pair["label"] == "b"
    [record] = preference_records(row)
    assert (
        record["chosen"][-1]["content"] == "a kind revision"
        and record["rejected"][-1]["content"] == "a rude first sample"
    )


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
    assert len(judge.completed) == 2 and all(
        json.loads(r.json_schema)["properties"]["choice"]["enum"] == ["A", "B"] for r in judge.completed
    )
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


# -- few-shot judging

SHOTS = tuple(
    ComparisonShot(
        conversation=({"role": "user", "content": f"shot question {k}"},),
        better=f"better answer {k}",
        worse=f"worse answer {k}",
    )
    for k in range(5)
)
WITH_SHOTS = dataclasses.replace(HARMLESS, comparison_few_shot=SHOTS)


def run_with(params, judge, data, constitution):
    ctx = StageContext(3, "compare", constitution, {"judge": judge}, {"judge": "j"})
    return run_stage(build("compare", params), data, ctx)


def shown_letter(turn):
    """The letter the shot's better answer sits under, read from the shot's text."""
    return "A" if "better answer" in turn.split("<response_a>")[1].split("</response_a>")[0] else "B"


def test_few_shot_zero_asks_exactly_as_before():
    plain, zero = Judge(), Judge()
    run({}, plain, rows(["kind", "rude"]))
    [row] = run_with({"few_shot": 0, "swap": False}, zero, rows(["kind", "rude"]), WITH_SHOTS).rows
    assert zero.scored[0].messages == plain.scored[0].messages
    principle = HARMLESS.principle(row["pairs"][0]["principle_ids"][0])
    expected = JUDGE_TEMPLATE.format(
        conversation="Human: q0",
        question=principle.comparison,
        first="kind",
        second="rude",
        instruction=ANSWER_INSTRUCTION,
    )
    assert zero.scored[0].messages == ({"role": "user", "content": expected},)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_few_shot_puts_n_shots_before_the_question_with_balanced_letters(n):
    judge = Judge()
    [row] = run_with({"few_shot": n, "swap": False}, judge, rows(["kind", "rude"]), WITH_SHOTS).rows
    [request] = judge.scored
    messages = request.messages
    assert len(messages) == 2 * n + 1 and [m["role"] for m in messages] == ["user", "assistant"] * n + ["user"]
    replies = [m["content"] for m in messages[1::2]]
    assert replies == ["A", "B", "A", "B"][:n]  # even shots: the better answer under (A), odd ones under (B)
    for k, (question, reply) in enumerate(zip(messages[0:-1:2], replies)):
        assert f"shot question {k}" in question["content"] and shown_letter(question["content"]) == reply
        assert question["content"].endswith(ANSWER_INSTRUCTION)
    principle = HARMLESS.principle(row["pairs"][0]["principle_ids"][0])
    assert all(
        principle.comparison in m["content"] for m in messages[::2]
    )  # the shots are asked under the vote's principle
    assert "<response_a>\nkind\n</response_a>" in messages[-1]["content"]
    assert row["pairs"][0]["p_first"] == pytest.approx(0.8)  # the scripted judge reads the last turn only


def test_parsed_shots_reply_in_json():
    judge = Parser(kind_letter)
    run_with({"few_shot": 2, "method": "parsed"}, judge, rows(["rude", "kind"]), WITH_SHOTS)
    for request in judge.completed:
        assert [m["content"] for m in request.messages[1:-1:2]] == ['{"choice": "A"}', '{"choice": "B"}']
        assert all(m["content"].endswith(PARSED_INSTRUCTION) for m in request.messages[::2])


def test_chain_of_thought_shots_come_before_the_reasoning():
    class Reasoner(Judge):
        def __init__(self):
            super().__init__()
            self.asked = []

        async def complete(self, r):
            self.asked.append(r)
            return Completion(texts=("Response A is kinder.",), completion_tokens=5, finish_reasons=("stop",))

        async def choice_logprobs(self, r, choices):
            self.scored.append(r)
            return {"A": math.log(0.7), "B": math.log(0.3)}

    judge = Reasoner()
    run_with({"chain_of_thought": True, "swap": False, "few_shot": 2}, judge, rows(["kind", "rude"]), WITH_SHOTS)
    [asked], [scored] = judge.asked, judge.scored
    assert [m["content"] for m in asked.messages[1:4:2]] == ["A", "B"] and asked.messages[-1]["content"].endswith(
        COT_INSTRUCTION
    )
    assert scored.messages[:5] == asked.messages and scored.messages[5]["content"] == "Response A is kinder."
    assert scored.messages[6]["content"] == ANSWER_INSTRUCTION


# -- a jury


class Fixed:
    """A juror whose P(first answer better) is `p` in both orders (position-free), or no choice at all."""

    def __init__(self, p):
        self.p = p

    async def choice_logprobs(self, r, choices):
        if self.p is None:
            return {c: float("-inf") for c in choices}
        text = r.messages[-1]["content"]
        first_under_a = "first" in text.split("<response_a>")[1].split("</response_a>")[0]
        p_a = self.p if first_under_a else 1 - self.p
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def run_jury(params, jurors, data):
    ctx = StageContext(3, "compare", HARMLESS, jurors, {role: f"model-{role}" for role in jurors})
    return run_stage(build("compare", params), data, ctx)


def test_jury_label_is_the_weighted_mean_of_the_jurors():
    [row] = run_jury(
        {"jury": {"judge": 1.0, "judge_api": 3.0}, "ensemble": 2},
        {"judge": Fixed(0.9), "judge_api": Fixed(0.2)},
        rows(["first", "second"]),
    ).rows
    [pair] = row["pairs"]
    # (1 * 0.9 + 3 * 0.2) / 4 = 1.5 / 4 = 0.375: the heavier juror's "second" wins
    assert pair["p_first"] == pytest.approx(0.375) and pair["label"] == "b"
    assert pair["jurors"]["judge"]["p_first"] == pytest.approx(0.9) and pair["jurors"]["judge"]["label"] == "a"
    assert pair["jurors"]["judge_api"]["p_first"] == pytest.approx(0.2) and pair["jurors"]["judge_api"]["label"] == "b"
    assert {r: (j["model"], j["weight"]) for r, j in pair["jurors"].items()} == {
        "judge": ("model-judge", 1.0),
        "judge_api": ("model-judge_api", 3.0),
    }
    assert (
        all(p == pytest.approx(0.375) for p in pair["principle_probs"].values()) and len(pair["principle_probs"]) == 2
    )
    assert len(pair["votes"]) == 2 * 2 * 2 and {v["juror"] for v in pair["votes"]} == {"judge", "judge_api"}
    assert pair["position_consistent"] is True and pair["method"] == "logprobs"
    assert row["models"] == {"judge": "model-judge", "judge_api": "model-judge_api"}


def test_a_juror_without_a_choice_is_left_out_of_the_mean():
    [row] = run_jury(
        {"jury": {"judge": 1.0, "judge_api": 3.0}, "method": "logprobs"},
        {"judge": Fixed(0.9), "judge_api": Fixed(None)},
        rows(["first", "second"]),
    ).rows
    [pair] = row["pairs"]
    assert (
        pair["jurors"]["judge_api"]["label"] == "invalid"
        and pair["p_first"] == pytest.approx(0.9)
        and pair["label"] == "a"
    )

    [row] = run_jury(
        {"jury": {"judge": 1.0, "judge_api": 3.0}, "method": "logprobs"},
        {"judge": Fixed(None), "judge_api": Fixed(None)},
        rows(["first", "second"]),
    ).rows
    assert row["pairs"][0]["label"] == "invalid" and row["pairs"][0]["p_first"] is None


def test_without_a_jury_rows_carry_no_juror_fields():
    [row] = run({}, Judge(), rows(["kind", "rude"])).rows
    assert "jurors" not in row["pairs"][0] and all("juror" not in v for v in row["pairs"][0]["votes"])
    assert build("compare", {}).roles == ("judge",) and build("compare", {"jury": {"a": 1, "b": 2}}).roles == ("a", "b")
