"""`cai eval-judge` on real HH-RLHF pairs with the tiny model as the judge."""

from __future__ import annotations

import json

import pytest

from cai.cli import main
from cai.eval_judge import load_pairs, wilson_interval
from conftest import SHARED_DATA
from pipeline_files import tiny_pipeline

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.dev.jsonl"


def test_pairs_split_into_context_and_final_answers():
    pairs = load_pairs(HH, limit=5)
    assert len(pairs) == 5
    first = json.loads(HH.read_text().splitlines()[0])
    assert pairs[0]["context"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first["chosen"].rstrip().endswith(pairs[0]["chosen"]) and first["rejected"].rstrip().endswith(pairs[0]["rejected"])
    assert pairs[0]["context"][-1]["role"] == "user"


def test_an_empty_final_answer_is_an_answer():
    [pair] = [p for p in load_pairs(HH, limit=87) if p["line"] == 87]
    assert pair["chosen"] == "" and pair["rejected"].startswith("Sure, the address is")
    assert pair["context"][-1] == {"role": "user", "content": "Sorry, can you tell me address again?"}


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0


def test_eval_judge_reports_figures(tiny_model, tmp_path, capsys):
    pipeline = tiny_pipeline(
        tmp_path, tiny_model, roles={"responder": "local", "judge": "local"}, stages=[{"type": "respond"}, {"type": "compare"}]
    )
    out = tmp_path / "judge.json"
    args = ["eval-judge", str(HH), "--pipeline", str(pipeline), "--limit", "8", "--json", str(out), "--compare-cot", "--injection"]
    assert main(args + ["--set", "stages.1.cot_max_tokens=8"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] + report["invalid"] + report["identical_answers"] == 8
    assert report["judge"]["chain_of_thought"] is False
    assert set(report["by_chain_of_thought"]) == {"off", "on"} and report["by_chain_of_thought"]["on"]["judge"]["chain_of_thought"]
    for variant in report["by_chain_of_thought"].values():
        keys = ["accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency"]
        for key in keys + ["injection_follow_rate", "injection_baseline_rate"]:
            assert 0.0 <= variant[key] <= 1.0
            low, high = variant[f"{key}_ci95"]
            assert low <= variant[key] <= high
        # the swap-averaged accuracy lies between the two orders' accuracies only pair by pair, but
        # the rejected answer's share without injection is exactly what the accuracy leaves over
        assert variant["injection_n"] == variant["n"]
        assert variant["injection_baseline_rate"] == pytest.approx(1 - variant["accuracy"])
    output = capsys.readouterr().out
    assert "chain of thought on" in output and "injection_follow_rate" in output


def test_bad_pairs_file_is_one_line(tmp_path, tiny_model, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "\\n\\nHuman: hi"}\n')
    pipeline = tiny_pipeline(tmp_path, tiny_model, roles={"responder": "local", "judge": "local"}, stages=[{"type": "compare"}])
    assert main(["eval-judge", str(bad), "--pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{bad}:1: rejected: the transcript must end with an Assistant turn after a Human turn"
