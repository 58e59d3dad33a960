"""`cai eval` end to end: three models on the tiny model through the real engine, rated by a scripted
judge (the canned server prefers the shorter answer with probability 0.9, in either order), so the
ratings are known: the terse model above the baseline, the verbose one below, intervals apart. Then
kill -9 mid-eval and rerun, adding a model, and the run's files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from canned_server import CannedServer
from pipeline_files import tiny_eval

from cai.cli import main
from cai.generate.store import read_shards
from cai.rating.ratings import ELO_PER_UNIT

P_SHORTER = 0.9  # the scripted judge's probability for the shorter answer
LIMIT = 6  # prompts per axis: 12 prompts, 3 models


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bisect(f, low: float, high: float) -> float:
    """The root of an increasing f between low and high."""
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if f(middle) < 0 else (low, middle)
    return (low + high) / 2


@pytest.fixture(scope="module")
def judge_url():
    # Each judge call takes 0.2 s: the judgments span seconds, so a test can kill a run in their midst.
    with CannedServer("--median-s", "0.2", "--sigma", "0", "--prefer", "shorter") as server:
        yield server.url


@pytest.fixture
def eval_file(tmp_path, tiny_model, judge_url):
    return tiny_eval(tmp_path, tiny_model, judge={"type": "openai", "model": "canned", "base_url": judge_url})


def cai_eval(eval_file, run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cai.cli",
            "eval",
            str(eval_file),
            "--run-dir",
            str(run_dir),
            "--limit",
            str(LIMIT),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the engine's worker processes die with the group
    )


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, judge_url):
    """One uninterrupted eval, and what it printed."""
    folder = tmp_path_factory.mktemp("reference")
    eval_file = tiny_eval(folder, tiny_model, judge={"type": "openai", "model": "canned", "base_url": judge_url})
    output = finished(cai_eval(eval_file, folder / "run", "--quiet"))
    return folder / "run", output


def test_the_preferred_model_rates_above_with_separated_intervals(reference):
    run_dir, _ = reference
    ratings = json.loads((run_dir / "ratings.json").read_text())
    assert ratings["baseline"] == "base" and list(ratings["axes"]) == ["harmless", "helpful"]
    for axis, figures in ratings["axes"].items():
        models = figures["models"]
        assert figures["n_prompts"] == LIMIT and figures["position_consistency"] == 1.0  # the rule ignores order
        base, terse, verbose = models["base"], models["terse"], models["verbose"]
        assert base["elo"] == 1000 and base["ci95"] == [1000, 1000] and base["win_rate_vs_baseline"] is None
        assert verbose["ci95"][1] < 1000 < terse["ci95"][0], axis
        # Every comparison says P(shorter better) = 0.9 and the lengths follow the models' token limits, so
        # each pair of models has the same comparisons. By symmetry theta_terse = d = -theta_verbose, and the
        # likelihood's derivative in d, 2 (0.9 - s(d)) + 2 (0.9 - s(2d)), vanishes where s(d) + s(2d) = 1.8
        # (not at logit(0.9): three 0.9 labels around a chain are not a Bradley-Terry world).
        d = bisect(lambda x: sigmoid(x) + sigmoid(2 * x) - 2 * P_SHORTER, 0.0, 10.0)
        assert terse["elo"] - 1000 == pytest.approx(ELO_PER_UNIT * d, rel=0.01)
        assert 1000 - verbose["elo"] == pytest.approx(ELO_PER_UNIT * d, rel=0.01)
        assert terse["win_rate_vs_baseline"] == pytest.approx(P_SHORTER)
        assert terse["win_rate_ci95"][0] < P_SHORTER < terse["win_rate_ci95"][1]
        assert terse["mean_length"] < base["mean_length"] < verbose["mean_length"]
        assert terse["n_comparisons"] == 2 * LIMIT and terse["n_answers"] == LIMIT
        assert set(terse) == {
            "elo",
            "ci95",
            "win_rate_vs_baseline",
            "win_rate_ci95",
            "lc_win_rate_vs_baseline",
            "refusal_rate",
            "n_comparisons",
            "mean_length",
            "n_answers",
        }
    rows = (run_dir / "ratings.csv").read_text().splitlines()
    assert rows[0].startswith("axis,model,elo,ci95_low,ci95_high") and len(rows) == 1 + 2 * 3


def test_the_run_is_quiet_and_its_report_shows_the_frontier(reference):
    run_dir, output = reference
    lines = output.splitlines()
    assert not [line for line in lines if "WARNING" in line or "INFO" in line], output  # the engine's go to the log
    assert len(lines) < 20 and (run_dir / "engine.log").stat().st_size > 0
    page = (run_dir / "report.html").read_text()
    assert 'alt="frontier"' in page and "terse" in page and "Sample comparisons" in page
    judgments = list(read_shards(run_dir / "judgments"))
    assert len(judgments) == 2 * LIMIT * 3 and all(len(j["votes"]) in (2, 4) for j in judgments)


def test_kill_9_mid_eval_and_rerun_gives_the_same_ratings(reference, eval_file, tmp_path):
    run_dir = tmp_path / "killed"
    proc = cai_eval(eval_file, run_dir, "--quiet")
    deadline = time.monotonic() + 300
    while sum(1 for _ in read_shards(run_dir / "judgments")) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    judged = sum(1 for _ in read_shards(run_dir / "judgments"))
    assert 4 <= judged < 2 * LIMIT * 3 and not (run_dir / "ratings.json").exists()

    finished(cai_eval(eval_file, run_dir, "--quiet"))
    for stage, count in (("answers", 2 * LIMIT * 3), ("judgments", 2 * LIMIT * 3)):
        ids = [record["id"] for record in read_shards(run_dir / stage)]
        assert len(ids) == len(set(ids)) == count  # nothing lost, nothing twice
    for name in ("ratings.json", "samples.json"):
        assert (run_dir / name).read_text() == (reference[0] / name).read_text()


def test_adding_a_model_judges_only_what_is_new(reference, eval_file, tmp_path, capsys):
    run_dir = tmp_path / "grown"
    shutil.copytree(reference[0], run_dir)  # a finished eval of the same file
    before = {j["id"]: j for j in read_shards(run_dir / "judgments")}

    assert (
        main(
            [
                "eval",
                str(eval_file),
                "--run-dir",
                str(run_dir),
                "--limit",
                str(LIMIT),
                "--quiet",
                "--set",
                "models.mid={backend: local, max_tokens: 6}",
            ]
        )
        == 0
    )
    invocation = json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]
    assert invocation["answers"]["new"] == 2 * LIMIT  # the new model's answers, and no other
    assert invocation["judgments"]["new"] == 2 * LIMIT * 3  # its comparisons with each of the three others
    after = {j["id"]: j for j in read_shards(run_dir / "judgments")}
    assert all(after[k] == v for k, v in before.items())
    helpful = json.loads((run_dir / "ratings.json").read_text())["axes"]["helpful"]["models"]
    assert helpful["terse"]["elo"] > helpful["mid"]["elo"] > helpful["base"]["elo"]
    assert "mid" in capsys.readouterr().out

    # and the report is rewritten from the run's files alone
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0 and 'alt="frontier"' in (run_dir / "report.html").read_text()
