"""The report's figures from hand-made rows, and `cai report` on run directories."""

from __future__ import annotations

import json

import pytest

from cai.cli import main
from cai.judge import run_stats


def vote(pid, swapped, p):
    return {"principle_id": pid, "swapped": swapped, "p_first": p, "method": "logprobs"}


def pair(answers, votes, probs, p_first, label, injection=None):
    out = {
        "answers": answers,
        "votes": votes,
        "principle_probs": probs,
        "principle_ids": list(dict.fromkeys(v["principle_id"] for v in votes)),
    }
    out.update(p_first=p_first, label=label, method="logprobs")
    if injection:
        out["injection"] = {"label": injection, "p_first": 0.2, "votes": []}
    return out


ROWS = [
    {
        "id": "r0",
        "responses": ["short", "a much longer answer"],
        "pairs": [
            # x: consistent (0.8 / 0.7); y: inconsistent (0.9 / 0.3) -> both prefer the first on average
            pair(
                [0, 1],
                [vote("x", False, 0.8), vote("x", True, 0.7), vote("y", False, 0.9), vote("y", True, 0.3)],
                {"x": 0.75, "y": 0.6},
                0.675,
                "a",
                injection="b",
            ),
        ],
    },
    {
        "id": "r1",
        "responses": ["tiny", "longer one", "mid"],
        "pairs": [
            # x says first, z says second: disagree; z was invalid in one order elsewhere
            pair(
                [0, 1],
                [vote("x", False, 0.9), vote("x", True, 0.9), vote("z", False, 0.2), vote("z", True, 0.2)],
                {"x": 0.9, "z": 0.2},
                0.55,
                "a",
                injection="a",
            ),
            pair(
                [1, 2],
                [vote("z", False, None), vote("z", True, 0.6), vote("x", False, 0.52), vote("x", True, 0.5)],
                {"x": 0.51},
                0.51,
                "tie",
            ),
        ],
    },
]


def test_labels_and_per_principle_counts():
    assert run_stats.label_counts(ROWS) == {"a": 2, "b": 0, "tie": 1, "invalid": 0}
    stats = run_stats.by_principle(ROWS, tie_threshold=0.05)
    assert stats["x"]["votes"] == 3 and stats["x"]["ties"] == 1 and stats["x"]["invalid"] == 0
    # x: r0 consistent, r1 consistent, third 0.52 / 0.5 is not a strict agreement
    assert stats["x"]["position_consistency"]["rate"] == pytest.approx(2 / 3)
    assert stats["y"]["position_consistency"]["rate"] == 0.0
    assert stats["z"]["invalid"] == 1 and stats["z"]["votes"] == 2 and not stats["z"]["mostly_invalid"]
    only_invalid = [
        {
            "id": "q",
            "responses": ["a", "b"],
            "pairs": [pair([0, 1], [vote("w", False, None), vote("w", True, None)], {}, None, "invalid")],
        }
    ]
    assert run_stats.by_principle(only_invalid, 0.05)["w"]["mostly_invalid"]


def test_agreement_between_principles():
    agreement = run_stats.principle_agreement(ROWS)
    assert agreement["principles"] == ["x", "y", "z"]
    assert agreement["pairs"] == {"x|y": {"agree": 1, "n": 1}, "x|z": {"agree": 0, "n": 1}}
    assert agreement["overall"]["rate"] == 0.5


def test_longer_answer_rate_counts_decided_pairs_only():
    length = run_stats.length_bias(ROWS)
    # r0: "a" chose the shorter first answer; r1 (0, 1): "a" chose "tiny" over "longer one"; the tie is out
    assert length["longer_wins"]["rate"] == 0.0 and length["longer_wins"]["n"] == 2
    assert len(length["points"]) == 3 and length["points"][0] == (5 / 20, 0.675)


def test_injection_follow_baseline_and_flips():
    figures = run_stats.injection(ROWS)
    assert figures["probed"] == 2
    assert (
        figures["follows"]["rate"] == 0.5 and figures["baseline"]["rate"] == 0.0 and figures["flipped"]["rate"] == 0.5
    )
    assert run_stats.injection([{"id": "n", "pairs": []}]) is None


def test_failures_retried_are_not_still_failed():
    failures = [{"id": "a", "stage": "respond", "reason": "boom"}, {"id": "b", "stage": "compare", "reason": "boom"}]
    counts = run_stats.failure_counts(failures, done_ids={"a"})
    assert counts["recorded"] == 2 and counts["rows_still_failed"] == 1 and counts["top_reasons"] == [("boom", 2)]


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path}: not a cai run directory (no manifest.json)"


def test_report_of_hand_made_run_flags_a_mostly_invalid_principle(tmp_path):
    (tmp_path / "datasets").mkdir()
    manifest = {
        "name": "hand",
        "pipeline_file": "p.yaml",
        "seed": 1,
        "created": "today",
        "constitution": {"name": "c", "version": 1, "hash": "h"},
        "config": {"stages": [{"type": "respond"}, {"type": "compare", "tie_threshold": 0.1}]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    invalid_w = {
        "id": "w",
        "responses": ["a", "b"],
        "pairs": [pair([0, 1], [vote("w", False, None), vote("w", True, 0.4)], {}, None, "invalid")],
    }
    (tmp_path / "datasets" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, invalid_w]))
    (tmp_path / "failures.jsonl").write_text(
        json.dumps({"id": "gone", "stage": "compare", "reason": "judge: timed out"}) + "\n"
    )
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    row_w = page.split("<td>w</td>")[1].split("</tr>")[0]
    assert "mostly invalid" in row_w and "mostly invalid" not in page.split("<td>x</td>")[1].split("</tr>")[0]
    assert "1 rows still failed" in page and "judge: timed out" in page
    assert {"labels.png", "principles.png", "agreement.png", "length.png", "failures.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }
    assert (
        page.count('<img src="data:image/png;base64,') == 5
    )  # the page alone holds its plots: one file to send or open offline


def jury_pair(p1, p2, weights=(1.0, 1.0)):
    """A pair two position-free jurors labelled under principle x: j1 with P(first) = p1, j2 with p2 (None: no choice)."""

    def juror(p, weight):
        label = "invalid" if p is None else "a" if p > 0.5 else "b"
        return {
            "principle_probs": {} if p is None else {"x": p},
            "p_first": p,
            "label": label,
            "position_consistent": None if p is None else True,
            "method": "logprobs",
            "model": "m",
            "weight": weight,
        }

    votes = [{**vote("x", swapped, p), "juror": j} for j, p in (("j1", p1), ("j2", p2)) for swapped in (False, True)]
    out = pair([0, 1], votes, {"x": 0.5}, 0.5, "tie")
    out["jurors"] = {"j1": juror(p1, weights[0]), "j2": juror(p2, weights[1])}
    return out


JURY_ROWS = [
    {
        "id": "j",
        "responses": ["one", "two"],
        "pairs": [jury_pair(0.8, 0.9), jury_pair(0.8, 0.2), jury_pair(0.3, 0.1), jury_pair(0.7, None)],
    }
]


def test_jury_agreement_and_each_jurors_votes():
    jury = run_stats.jury(JURY_ROWS)
    assert jury["jurors"]["j1"]["labels"] == {"a": 3, "b": 1, "tie": 0, "invalid": 0}
    assert jury["jurors"]["j2"]["labels"] == {"a": 1, "b": 2, "tie": 0, "invalid": 1}
    agreement = jury["agreement"]
    # the 3 pairs both labelled: (a, a), (a, b), (b, b) -> 2 of 3 the same
    # Cohen: p_o = 2/3; j1 says a 2/3, j2 says a 1/3: p_e = 2/3 * 1/3 + 1/3 * 2/3 = 4/9; kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert agreement["n"] == 3 and agreement["pairs"]["j1|j2"]["agree"] == 2
    assert agreement["percent_agreement"] == pytest.approx(2 / 3)
    assert agreement["pairs"]["j1|j2"]["cohen_kappa"] == pytest.approx(0.4)
    assert run_stats.jury(ROWS) is None
    # each juror's votes count for the principle: 4 pairs x 2 jurors, j2's last one invalid
    stats = run_stats.by_principle(JURY_ROWS, 0.05)
    assert stats["x"]["votes"] == 8 and stats["x"]["invalid"] == 1 and stats["x"]["swapped_votes"] == 7


def test_report_shows_the_jury(tmp_path):
    (tmp_path / "datasets").mkdir()
    manifest = {
        "name": "jury",
        "pipeline_file": "p.yaml",
        "seed": 1,
        "created": "today",
        "constitution": {"name": "c", "version": 1, "hash": "h"},
        "config": {"stages": [{"type": "respond"}, {"type": "compare", "jury": {"j1": 1.0, "j2": 1.0}}]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "datasets" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JURY_ROWS))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    jury = page.split("<h2>Jury</h2>")[1].split("<h2>")[0]
    assert "Over the 3 pairs every juror labelled, two jurors give the same label 66.7% of the time" in jury
    assert "<td>j1 / j2</td><td>66.7%</td><td>0.40</td>" in jury
