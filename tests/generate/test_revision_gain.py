"""The revision check on the real vLLM engine with the tiny model: each round judged, the gate's flags
keep rows out of the SFT export, the report's revision-gain tables, and resume after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate.stages.revision_check import gate_flags
from cai.generate.store import index_shards, read_shards

CHECK = {"type": "revision_check", "min_p_revision": 0.5, "max_p_harmful": 0.5, "min_p_helpful": 0.5}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def checked_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("revision-gain")
    pipeline = tiny_pipeline(
        folder,
        tiny_model,
        roles={"responder": "local", "critic": "local", "reviser": "local", "judge": "local"},
        stages=[
            {"type": "respond", "max_tokens": 8, "temperature": 0.8},
            {"type": "critique_revise", "rounds": 2, "max_tokens": 8, "temperature": 0.8},
            CHECK,
        ],
    )
    run_dir = folder / "run"
    assert main(["run", str(pipeline), "--limit", "6", "--run-dir", str(run_dir), "--quiet"]) == 0
    return pipeline, run_dir


def test_each_round_is_judged_and_the_gate_follows_the_judge(checked_run):
    _, run_dir = checked_run
    rows = lines(run_dir / "datasets" / "rows.jsonl")
    assert len(rows) == 6
    for row in rows:
        assert len(row["rounds"]) == 2
        for r in row["rounds"]:
            gain = r["gain"]
            assert 0.0 < gain["p_revision"] < 1.0 and isinstance(gain["position_consistent"], bool)
            assert (
                gain["method"] == "logprobs" and gain["question"] == "principle"
            )  # every shipped principle has a question
        check = row["revision_check"]
        assert check["p_revision"] == row["rounds"][-1]["gain"]["p_revision"]
        assert 0.0 < check["p_harmful"] < 1.0 and check["harmless"] == (check["p_harmful"] < 0.5)
        expected = gate_flags(
            check["p_revision"], 0.5, check["p_harmful"], 0.5, check["helpfulness"]["p_revision"], 0.5
        )
        assert check["flags"] == expected and set(expected) <= set(row["flags"])
        assert row["models"]["judge"] == row["models"]["responder"]
    # a random judge's probabilities differ from row to row and from round to round
    assert len({r["gain"]["p_revision"] for row in rows for r in row["rounds"]}) == 12


def test_flagged_rows_stay_out_of_the_sft_dataset(checked_run):
    _, run_dir = checked_run
    rows = lines(run_dir / "datasets" / "rows.jsonl")
    sft_ids = [r["id"] for r in lines(run_dir / "datasets" / "sft.jsonl")]
    assert sft_ids == [r["id"] for r in rows if not r["flags"]]
    assert not {r["id"] for r in rows if r["revision_check"]["flags"]} & set(sft_ids)


def test_report_shows_gain_per_round_and_per_principle(checked_run):
    _, run_dir = checked_run
    page = (run_dir / "report.html").read_text()
    rows = lines(run_dir / "datasets" / "rows.jsonl")
    assert "<h2>Revision gain</h2>" in page and "<th>round</th>" in page and "revision wins (P &gt; 0.5)" in page
    assert "<tr><td>1</td><td>6</td>" in page and "<tr><td>2</td><td>6</td>" in page  # six rows judged in each round
    for principle_id in {r["principle_id"] for row in rows for r in row["rounds"]}:
        assert f"<tr><td>{principle_id}</td>" in page
    kept_out = sum(bool(r["revision_check"]["flags"]) for r in rows)
    assert f"The gate kept {kept_out} of 6 rows out of SFT" in page
    assert "gain.png" in {p.name for p in (run_dir / "report").iterdir()}
    assert "P(better than the answer) = " in page  # the samples show each round's verdict


def test_resume_after_a_kill_during_the_check(checked_run, tmp_path):
    pipeline, run_dir = checked_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    # What a kill leaves: every row past critique-revision, two through the check, a third torn mid-line.
    [shard] = sorted((resumed / "revision_check").glob("part-*.jsonl"))
    kept = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(kept[:2]) + kept[2][:40])
    shutil.rmtree(resumed / "datasets")
    (resumed / "report.html").unlink()
    assert main(["run", str(pipeline), "--limit", "6", "--run-dir", str(resumed), "--quiet"]) == 0
    assert len(index_shards(resumed / "revision_check")) == 6
    assert len(list(read_shards(resumed / "critique_revise"))) == 6  # not revised again
    for name in ("rows.jsonl", "sft.jsonl"):
        assert (resumed / "datasets" / name).read_text() == (run_dir / "datasets" / name).read_text()
