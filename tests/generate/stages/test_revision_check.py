"""The revision check: gains per round, the acceptance gate and its flags, from a scripted judge whose
probabilities are known, so every figure is checked against a value computed by hand; the real engine
runs it in tests/generate/test_revision_gain.py."""

from __future__ import annotations

import json
import math

import pytest
from stage_runner import run_stage

from cai.cli import main
from cai.generate.backends.base import BackendCallError
from cai.generate.constitution import Constitution, Principle
from cai.generate.export import export
from cai.generate.stages import StageContext, build
from cai.generate.stages.revision_check import DEFAULT_COMPARISON, HELPFULNESS_QUESTION, gate_flags
from cai.judge import run_stats

KIND = Principle(id="kind", critique="Is it unkind?", revision="Make it kind.", comparison="Which response is kinder?")
PLAIN = Principle(id="plain", critique="Is it plain?", revision="Make it plain.")  # no comparison question
CONSTITUTION = Constitution(name="t", version=1, principles=(KIND, PLAIN))
BIAS = 0.05  # every answer is pulled this much towards the letter A


def between(text: str, start: str, end: str) -> str:
    return text.split(start)[1].split(end)[0]


class Judge:
    """Comparisons: P(A better) = 0.8 when only A holds the word that matters (`help` under the
    helpfulness question, `kind` otherwise), 0.2 when only B does, 0.5 when both or neither; plus BIAS.
    The harmfulness question: P(yes) = 0.9 for a request about a bomb, else 0.2; plus BIAS on A."""

    def __init__(self):
        self.questions = []

    async def choice_logprobs(self, r, choices):
        text = r.messages[-1]["content"]
        if "<response_a>" in text:
            word = "help" if HELPFULNESS_QUESTION in text else "kind"
            self.questions.append(between(text, "</conversation>\n\n", "\n\nOptions:"))
            a, b = (word in between(text, f"<response_{x}>", f"</response_{x}>") for x in "ab")
            p_a = 0.5 + 0.3 * (a - b)
        else:
            p_yes = 0.9 if "bomb" in between(text, "<conversation>", "</conversation>") else 0.2
            p_a = p_yes if "(A) yes" in text else 1 - p_yes
        p_a += BIAS
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def row(row_id, prompt, response, *rounds):
    return {
        "id": row_id,
        "messages": [{"role": "user", "content": prompt}],
        "response": response,
        "rounds": [{"principle_id": pid, "critique": "c", "revision": text} for pid, text in rounds],
        "revision": rounds[-1][1],
        "principle_ids": [pid for pid, _ in rounds],
        "flags": [],
        "seed": 5,
        "constitution_hash": "h",
        "pipeline": "p",
    }


ROWS = [
    row("evasive", "how do I bake bread?", "happy to help: knead it", ("kind", "a kind refusal")),
    row("harmful", "how do I build a bomb?", "happy to help: mix this", ("kind", "a kind refusal")),
    row("worse", "how do I bake a cake?", "a kind start", ("kind", "a kind middle"), ("plain", "rude end")),
]


def check(params=None, rows=ROWS, judge=None):
    judge = judge or Judge()
    ctx = StageContext(5, "revision_check", CONSTITUTION, {"judge": judge}, {"judge": "j"})
    return run_stage(build("revision_check", params or {}), rows, ctx), judge


def test_gate_arithmetic():
    assert gate_flags(0.49, 0.5) == ["revision_not_preferred"]
    assert gate_flags(0.5, 0.5) == [] and gate_flags(0.9, 0.95) == ["revision_not_preferred"]
    assert gate_flags(None, 0.0) == ["revision_not_preferred"]  # no verdict is no acceptance
    assert gate_flags(0.7, 0.5, p_harmful=0.3, p_helpful=0.4) == ["refuses_harmless_request"]
    assert gate_flags(0.7, 0.5, p_harmful=0.6, p_helpful=0.4) == []  # a harmful request may be refused
    assert gate_flags(0.7, 0.5, p_harmful=0.3, p_helpful=0.6) == []
    assert gate_flags(0.7, 0.5, p_harmful=0.3, max_p_harmful=0.2, p_helpful=0.4) == []
    assert gate_flags(0.7, 0.5, p_harmful=0.3, p_helpful=0.4, min_p_helpful=0.3) == []
    assert (
        gate_flags(0.7, 0.5, p_harmful=None, p_helpful=0.1) == []
        and gate_flags(0.7, 0.5, p_harmful=0.1, p_helpful=None) == []
    )
    assert gate_flags(0.2, 0.5, p_harmful=0.1, p_helpful=0.1) == ["revision_not_preferred", "refuses_harmless_request"]


def test_gains_per_round_swap_averaged_with_hand_computed_values():
    result, judge = check()
    evasive, _, worse = result.rows
    # kind revision vs unkind answer: shown first P(A) = 0.8 + 0.05; shown second P(A) = 0.2 + 0.05,
    # so P(revision) = 1 - 0.25 = 0.75 there; the swap average removes the pull: (0.85 + 0.75) / 2
    assert evasive["rounds"][0]["gain"] == {
        "p_revision": pytest.approx(0.8),
        "position_consistent": True,
        "method": "logprobs",
        "question": "principle",
    }
    # neither or both hold the word: 0.55 and 1 - 0.55, a tie the orders disagree on
    assert (
        worse["rounds"][0]["gain"]["p_revision"] == pytest.approx(0.5)
        and worse["rounds"][0]["gain"]["position_consistent"] is False
    )
    # round 2's principle has no comparison question: the default one is asked; the rude end loses
    assert worse["rounds"][1]["gain"]["question"] == "default" and worse["rounds"][1]["gain"][
        "p_revision"
    ] == pytest.approx(0.2)
    assert DEFAULT_COMPARISON in judge.questions and KIND.comparison in judge.questions
    # per row: one comparison per round, the helpfulness one, each in two orders; two harmfulness asks
    assert len(judge.questions) == 2 * (1 + 1 + 1 + 1 + 2 + 1)
    assert worse["models"] == {"judge": "j"}


def test_gate_flags_not_preferred_and_refusals_of_harmless_requests():
    evasive, harmful, worse = check()[0].rows
    # P(harmful): yes shown as A: 0.2 + 0.05, yes shown as B: 1 - (0.8 + 0.05) -> (0.25 + 0.15) / 2
    assert (
        evasive["revision_check"]["p_harmful"] == pytest.approx(0.2) and evasive["revision_check"]["harmless"] is True
    )
    assert (
        harmful["revision_check"]["p_harmful"] == pytest.approx(0.9) and harmful["revision_check"]["harmless"] is False
    )
    # the refusal drops "help": P(revision more helpful) = (0.25 + 0.15) / 2
    assert evasive["revision_check"]["helpfulness"]["p_revision"] == pytest.approx(0.2)
    assert evasive["flags"] == ["refuses_harmless_request"]  # the judge prefers it under the principle, though
    assert harmful["flags"] == []  # refusing a harmful request is what the revision is for
    assert worse["flags"] == ["revision_not_preferred"] and worse["revision_check"]["p_revision"] == pytest.approx(0.2)


def test_thresholds_and_the_helpfulness_switch():
    rows = check({"min_p_revision": 0.9, "max_p_harmful": 0.1})[0].rows
    assert [r["flags"] for r in rows] == [["revision_not_preferred"]] * 3
    result, judge = check({"helpfulness": False})
    assert len(judge.questions) == 2 * (1 + 1 + 2)  # the rounds' comparisons only
    assert [r["flags"] for r in result.rows] == [[], [], ["revision_not_preferred"]]
    assert "p_harmful" not in result.rows[0]["revision_check"]


def test_earlier_flags_are_kept():
    flagged = {**ROWS[2], "flags": ["revision_repeats_critique"]}
    [out] = check(rows=[flagged])[0].rows
    assert out["flags"] == ["revision_repeats_critique", "revision_not_preferred"]
    assert out["revision_check"]["flags"] == ["revision_not_preferred"]


def test_a_failed_judge_call_fails_the_row():
    class Broken(Judge):
        async def choice_logprobs(self, r, choices):
            raise BackendCallError("judge: choice log-probabilities failed: boom")

    result, _ = check(rows=ROWS[:1], judge=Broken())
    assert result.rows == [] and "boom" in result.failures[0]["reason"]


def test_run_stats_per_round_per_principle_and_gate_counts():
    rows = check()[0].rows
    gain = run_stats.revision_gain([*rows, {"id": "unchecked", "response": "x"}])
    assert gain["rows"] == 3
    # round 1: 0.8, 0.8, 0.5 -> two wins of three; round 2: 0.2 -> none of one
    assert gain["by_round"][1]["wins"]["rate"] == pytest.approx(2 / 3) and gain["by_round"][1]["n"] == 3
    assert gain["by_round"][1]["mean_p_revision"] == pytest.approx(0.7)
    assert gain["by_round"][1]["position_consistency"]["rate"] == pytest.approx(2 / 3)
    assert gain["by_round"][2]["wins"]["rate"] == 0.0 and gain["by_round"][2]["wins"]["n"] == 1
    low, high = gain["by_round"][1]["wins"]["ci95"]
    assert low < 2 / 3 < high
    assert set(gain["by_principle"]) == {"kind", "plain"} and gain["by_principle"]["kind"]["n"] == 3
    assert gain["helpfulness"]["wins"]["rate"] == 0.0  # 0.2, 0.2, 0.5
    assert gain["gate"] == {
        "kept_out": 2,
        "revision_not_preferred": 1,
        "refuses_harmless_request": 1,
        "harmless_requests": 2,
        "unclassified_requests": 0,
    }
    assert run_stats.revision_gain([{"id": "x", "response": "y"}]) is None


def test_flagged_rows_stay_out_of_the_sft_export(tmp_path):
    rows = check()[0].rows
    counts = export(rows, tmp_path / "datasets")
    records = [json.loads(x) for x in (tmp_path / "datasets" / "sft.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["harmful"] and counts == {"rows": 3, "sft": 1, "flagged": 2}


def test_report_of_a_checked_run_and_of_one_without_the_check(tmp_path):
    rows = check()[0].rows
    manifest = {
        "name": "hand",
        "pipeline_file": "p.yaml",
        "seed": 5,
        "created": "today",
        "constitution": {"name": "t", "version": 1, "hash": "h"},
        "config": {
            "stages": [
                {"type": "respond"},
                {"type": "critique_revise", "rounds": 2},
                {"type": "revision_check", "min_p_revision": 0.5},
            ]
        },
    }
    for name, data in (
        ("checked", rows),
        ("plain", [{k: v for k, v in r.items() if k != "revision_check"} for r in rows]),
    ):
        (tmp_path / name / "datasets").mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        (tmp_path / name / "datasets" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        assert main(["report", str(tmp_path / name)]) == 0
    page = (tmp_path / "checked" / "report.html").read_text()
    by_round = page.split("<th>round</th>")[1].split("</table>")[0]
    assert "<tr><td>1</td><td>3</td><td>66.7% (95% CI 20.8-93.9%, n=3)</td><td>0.700</td>" in by_round
    assert "<tr><td>2</td><td>1</td><td>0.0% (95% CI 0.0-79.3%, n=1)</td><td>0.200</td>" in by_round
    by_principle = page.split("<th>principle</th>")[1].split("</table>")[0]
    assert "<tr><td>kind</td><td>3</td>" in by_principle and "<tr><td>plain</td><td>1</td>" in by_principle
    assert (
        "The gate kept 2 of 3 rows out of SFT: 1 whose final revision" in page
        and ", 1 whose final revision is less helpful" in page
    )
    assert "(2 requests called harmless, 0 without a verdict)" in page
    assert "gain.png" in {p.name for p in (tmp_path / "checked" / "report").iterdir()}
    assert "Revision gain" not in (tmp_path / "plain" / "report.html").read_text()


def test_parsed_choices_judge_the_revisions_and_leave_the_request_unclassified():
    from cai.generate.backends.base import Completion

    class Parser:
        async def choice_logprobs(self, r, choices):
            raise AssertionError("method: parsed must not ask for log-probabilities")

        async def complete(self, r):
            text = r.messages[-1]["content"]
            return Completion(
                texts=(
                    '{"choice": "A"}'
                    if "kind" in between(text, "<response_a>", "</response_a>")
                    else '{"choice": "B"}',
                ),
                completion_tokens=4,
            )

    result, _ = check({"method": "parsed"}, rows=ROWS[2:], judge=Parser())
    [worse] = result.rows
    assert [r["gain"]["p_revision"] for r in worse["rounds"]] == [0.5, 0.0] and worse["rounds"][1]["gain"][
        "method"
    ] == "parsed"
    assert worse["revision_check"]["p_harmful"] is None and worse["revision_check"]["harmless"] is None
    assert worse["flags"] == ["revision_not_preferred"] and result.completion_tokens == 4 * 2 * 3
    assert run_stats.revision_gain(result.rows)["gate"]["unclassified_requests"] == 1
