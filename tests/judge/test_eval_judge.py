"""`cai eval-judge` on real HH-RLHF pairs with the tiny model as the judge."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from locations import SHARED_DATA
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate.importers import load_pairs
from cai.judge.eval_judge import wilson_interval

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.dev.jsonl"


def test_pairs_split_into_context_and_final_answers():
    pairs = load_pairs(HH, limit=5)
    assert len(pairs) == 5
    first = json.loads(HH.read_text().splitlines()[0])
    assert pairs[0]["context"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first["chosen"].rstrip().endswith(pairs[0]["chosen"]) and first["rejected"].rstrip().endswith(
        pairs[0]["rejected"]
    )
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
        tmp_path,
        tiny_model,
        roles={"responder": "local", "judge": "local"},
        stages=[{"type": "respond"}, {"type": "compare"}],
    )
    out = tmp_path / "judge.json"
    args = [
        "eval-judge",
        str(HH),
        "--pipeline",
        str(pipeline),
        "--limit",
        "8",
        "--json",
        str(out),
        "--compare-cot",
        "--injection",
    ]
    assert main(args + ["--set", "stages.1.cot_max_tokens=8", "--log", str(tmp_path / "judge.log")]) == 0
    report = json.loads(out.read_text())
    assert report["n"] + report["invalid"] + report["identical_answers"] == 8
    assert report["judge"]["chain_of_thought"] is False
    assert (
        set(report["by_chain_of_thought"]) == {"off", "on"}
        and report["by_chain_of_thought"]["on"]["judge"]["chain_of_thought"]
    )
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
    captured = capsys.readouterr()
    assert "chain of thought on" in captured.out and "injection_follow_rate" in captured.out
    assert captured.err == ""  # the engine's warnings went to the log
    assert (tmp_path / "judge.log").stat().st_size > 0


def test_calibrate_writes_a_file_and_diagram_and_a_pipeline_naming_it_calibrates_each_vote(tiny_model, tmp_path):
    pipeline = tiny_pipeline(
        tmp_path,
        tiny_model,
        roles={"responder": "local", "judge": "local"},
        stages=[{"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0}, {"type": "compare"}],
    )
    out, report_file = tmp_path / "cal" / "calibration.json", tmp_path / "judge.json"
    args = [
        "eval-judge",
        str(HH),
        "--pipeline",
        str(pipeline),
        "--limit",
        "8",
        "--calibrate",
        str(out),
        "--json",
        str(report_file),
    ]
    assert main(args) == 0
    report = json.loads(report_file.read_text())
    figures = report["calibration"]
    assert report["judge"]["calibration"] is None
    # the pipeline has no calibration: "before" is the judge as measured
    assert figures["ece_before"] == pytest.approx(report["ece"])
    assert 0 <= figures["ece_after"] <= 1 and figures["nll_after"] > 0 and figures["temperature"] > 0
    assert figures["votes"] == 2 * report["n"]  # one principle, both orders, per judged pair
    assert (
        figures["reliability_png"] == str(out.with_suffix(".png"))
        and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    )
    assert (
        0 <= report["length_win_rate"] <= 1
        and 0 <= report["human_length_win_rate"] <= 1
        and report["length_n"] <= report["n"]
    )
    doc = json.loads(out.read_text())
    assert (doc["temperature"], doc["position_offset"]) == (figures["temperature"], figures["position_offset"])
    assert doc["fitted_on"]["n"] == report["n"] and doc["fitted_on"]["judge_model"] == str(tiny_model)
    assert doc["fitted_on"]["pairs"] == str(HH.resolve()) and doc["figures"]["ece_after"] == figures["ece_after"]

    # The pipeline names the file, relative to itself: each vote calibrated from the judge's own p.
    run_dir = tmp_path / "run"
    calibrated = ["--set", "stages.1.calibration=cal/calibration.json"]
    assert main(["run", str(pipeline), "--limit", "3", "--run-dir", str(run_dir), "--quiet", *calibrated]) == 0
    rows = [json.loads(line) for line in (run_dir / "datasets" / "rows.jsonl").read_text().splitlines()]
    pairs = [pair for row in rows for pair in row["pairs"]]
    assert pairs
    temperature, offset = doc["temperature"], doc["position_offset"]
    for pair in pairs:
        assert pair["calibration"] == hashlib.sha256(out.read_bytes()).hexdigest()
        for vote in pair["votes"]:
            p_a = 1 - vote["p_first_raw"] if vote["swapped"] else vote["p_first_raw"]
            calibrated_a = 1 / (1 + math.exp(-(math.log(p_a / (1 - p_a)) - offset) / temperature))
            assert vote["p_first"] == pytest.approx(1 - calibrated_a if vote["swapped"] else calibrated_a, abs=1e-9)
        assert pair["p_first"] == pytest.approx(sum(v["p_first"] for v in pair["votes"]) / 2, abs=1e-12)


def test_bad_pairs_file_is_one_line(tmp_path, tiny_model, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "\\n\\nHuman: hi"}\n')
    pipeline = tiny_pipeline(
        tmp_path, tiny_model, roles={"responder": "local", "judge": "local"}, stages=[{"type": "compare"}]
    )
    assert main(["eval-judge", str(bad), "--pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{bad}:1: rejected: the transcript must end with an Assistant turn after a Human turn"
