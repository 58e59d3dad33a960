"""A jury of two real backends: the tiny model in the local engine and the same model behind the real
vLLM OpenAI server, through `cai run` (rows, report) and `cai eval-judge` (each juror's figures)."""

from __future__ import annotations

import json

import pytest
import yaml
from api_server import API_KEY, KEY_ENV, SERVED_NAME
from locations import SHARED_DATA
from pipeline_files import tiny_pipeline

from cai.cli import main

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.dev.jsonl"
WEIGHTS = {"judge": 1.0, "judge_api": 3.0}


@pytest.fixture
def server(tiny_api_server):
    return tiny_api_server


def test_a_jury_of_a_local_engine_and_an_api_server(tiny_model, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    pipeline = tiny_pipeline(
        tmp_path,
        tiny_model,
        roles={"responder": "local", "judge": "local", "judge_api": "api"},
        stages=[
            {"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0},
            {"type": "compare", "ensemble": 2, "jury": WEIGHTS},
        ],
    )
    doc = yaml.safe_load(pipeline.read_text())
    doc["backends"]["api"] = {
        "type": "openai",
        "model": SERVED_NAME,
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "max_concurrency": 8,
    }
    pipeline.write_text(yaml.safe_dump(doc, sort_keys=False))

    run_dir = tmp_path / "run"
    assert main(["run", str(pipeline), "--run-dir", str(run_dir), "--limit", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run_dir / "datasets" / "rows.jsonl").read_text().splitlines()]
    pairs = [pair for row in rows for pair in row["pairs"]]
    assert rows and pairs
    for row in rows:
        assert row["models"]["judge"] == str(tiny_model) and row["models"]["judge_api"] == SERVED_NAME
    for pair in pairs:
        jurors = pair["jurors"]
        assert set(jurors) == set(WEIGHTS) and {v["juror"] for v in pair["votes"]} == set(WEIGHTS)
        assert len(pair["votes"]) == 2 * 2 * 2  # jurors x principles x orders
        given = {role: j["p_first"] for role, j in jurors.items() if j["p_first"] is not None}
        if given:  # the pair's p: the weighted mean of the jurors that gave one
            expected = sum(WEIGHTS[r] * p for r, p in given.items()) / sum(WEIGHTS[r] for r in given)
            assert pair["p_first"] == pytest.approx(expected)
        else:
            assert pair["p_first"] is None and pair["label"] == "invalid"
    page = (run_dir / "report.html").read_text()
    assert "<h2>Jury</h2>" in page and "<td>judge_api</td>" in page

    out = tmp_path / "judge.json"
    assert main(["eval-judge", str(HH), "--pipeline", str(pipeline), "--limit", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["judge"]["jury"] == {
        "judge": {"model": str(tiny_model), "weight": 1.0},
        "judge_api": {"model": SERVED_NAME, "weight": 3.0},
    }
    for figures in (report, *report["jurors"].values()):
        assert figures["n"] + figures["invalid"] + figures["identical_answers"] == 4
        assert 0.0 <= figures["accuracy"] <= 1.0
    assert set(report["jurors"]) == set(WEIGHTS)
    agreement = report["juror_agreement"]
    assert agreement["jurors"] == ["judge", "judge_api"] and agreement["n"] <= 4
    output = capsys.readouterr().out
    assert "juror judge_api" in output and "jurors agree" in output
