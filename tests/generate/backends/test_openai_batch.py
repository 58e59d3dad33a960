"""The Batch API backend against a fake Batch API (tests/batch_server.py: OpenAI's files and batches
endpoints, scripted answers), and its request format against vLLM's own offline batch runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_server import SERVED_NAME, engine_args
from batch_server import BatchServer
from canned_server import MODEL, CannedServer
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate.backends import BackendSpec, ChatRequest, create
from cai.generate.backends.openai_api import chat_body, parse_completion
from cai.generate.backends.openai_batch import input_line, line_answer
from cai.generate.stages.compare import CHOICE_SCHEMA

PRICES = {
    "input_per_million": 2.0,
    "output_per_million": 8.0,
    "batch_input_per_million": 1.0,
    "batch_output_per_million": 4.0,
}


@pytest.fixture
def api():
    with BatchServer() as server:
        yield server


def batch_backend(url: str, **settings) -> dict:
    return {"type": "openai_batch", "model": MODEL, "base_url": url, "batch_size": 64, "poll_seconds": 0.05, **settings}


def ask(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": text},), **{"max_tokens": 8, **kw})


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def states(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "batches" / "b").glob("[0-9]*.json"))]


def test_requests_go_in_batches_and_come_back_to_their_callers(api):
    b = batch_backend(api.url, batch_size=3)
    backend = create(
        BackendSpec(
            name="b",
            type="openai_batch",
            model=MODEL,
            settings={k: v for k, v in b.items() if k not in ("type", "model")},
        )
    )
    try:
        out = backend.complete([ask(f"question {i}") for i in range(7)] + [ask("json", json_schema=CHOICE_SCHEMA)])
        scores = backend.choice_logprobs([ask("Answer A or B.")], ["A", "B"])[0]
    finally:
        backend.close()
    assert [c.text for c in out[:7]] == [f"canned answer to: question {i}" for i in range(7)]
    assert all(c.ok and c.completion_tokens == 8 and c.prompt_tokens > 0 for c in out)
    assert scores == pytest.approx({"A": -0.5108, "B": -0.9163}, abs=1e-3)  # the canned judge's 0.6 / 0.4
    stats = api.stats()
    assert stats["batches"] == 3 + 1  # 8 completions in batches of at most 3, then the scoring request
    assert sorted(stats["paid"].values()) == [1] * 9


def run_pipeline(pipeline: Path, run_dir: Path, *args: str) -> int:
    return main(["run", str(pipeline), "--run-dir", str(run_dir), "--quiet", "--limit", "6", *args])


def sl_cai(folder: Path, model: Path, backend: dict) -> Path:
    folder.mkdir(exist_ok=True)
    return tiny_pipeline(
        folder,
        model,
        rounds=1,
        rows_in_flight=8,
        backends={"b": backend},
        roles={"responder": "b", "critic": "b", "reviser": "b"},
    )


def test_sl_cai_over_batches_gives_the_online_datasets_at_half_the_cost(api, tiny_model, tmp_path):
    with CannedServer("--median-s", "0", "--sigma", "0") as online:
        online_backend = {"type": "openai", "model": MODEL, "base_url": online.url, "prices": PRICES}
        assert run_pipeline(sl_cai(tmp_path / "online", tiny_model, online_backend), tmp_path / "online" / "run") == 0
    batch = sl_cai(tmp_path / "batch", tiny_model, batch_backend(api.url, prices=PRICES))
    assert run_pipeline(batch, tmp_path / "batch" / "run") == 0
    for name in ("rows.jsonl", "sft.jsonl"):
        assert (tmp_path / "batch" / "run" / "datasets" / name).read_bytes() == (
            tmp_path / "online" / "run" / "datasets" / name
        ).read_bytes()
    # a row goes through one batch per step: answers, critiques, revisions
    assert [s["phase"] for s in states(tmp_path / "batch" / "run")] == ["done"] * 3
    cost = lambda d: json.loads((d / "manifest.json").read_text())["invocations"][-1]["backends"]["b"]["cost"]
    assert cost(tmp_path / "batch" / "run") / cost(tmp_path / "online" / "run") == pytest.approx(0.5)
    assert sorted(set(api.stats()["paid"].values())) == [1]


@pytest.mark.parametrize("phase", ["upload", "create", "poll", "download"])
def test_killed_in_any_phase_resumes_the_same_batches_and_pays_nothing_twice(api, tiny_model, tmp_path, phase):
    reference = sl_cai(tmp_path / "ref", tiny_model, batch_backend(api.url))
    assert run_pipeline(reference, tmp_path / "ref" / "run") == 0
    paid_before = api.stats()["paid"]

    with BatchServer() as fresh:
        pipeline = sl_cai(tmp_path / "killed", tiny_model, batch_backend(fresh.url))
        run_dir = tmp_path / "killed" / "run"
        fresh.control(hold=[phase])
        argv = ["run", str(pipeline), "--run-dir", str(run_dir), "--quiet", "--limit", "6"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cai.cli", *argv], start_new_session=True, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not fresh.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert fresh.stats()["waiting"] == {phase: 1}
        fresh.control(hold=[])
        assert main(argv) == 0
        paid, batches = fresh.stats()["paid"], fresh.stats()["batches"]
    for name in ("rows.jsonl", "sft.jsonl"):
        assert (run_dir / "datasets" / name).read_bytes() == (tmp_path / "ref" / "run" / "datasets" / name).read_bytes()
    assert paid == paid_before  # the same requests, each answered (and paid) once
    assert batches == 3  # answers, critiques, revisions: none created twice (a batch is paid when it runs)
    assert all(s["phase"] == "done" for s in states(run_dir)) and len(states(run_dir)) == 3


def test_an_expired_batch_is_sent_once_more_then_its_rows_fail_with_the_reason(api, tiny_model, tmp_path, capsys):
    api.control(expire=1)
    once = sl_cai(tmp_path / "once", tiny_model, batch_backend(api.url))
    assert run_pipeline(once, tmp_path / "once" / "run") == 0
    assert [(s["status"], s["attempt"]) for s in states(tmp_path / "once" / "run")][:2] == [
        ("expired", 1),
        ("completed", 2),
    ]

    api.control(expire=2)
    twice = sl_cai(tmp_path / "twice", tiny_model, batch_backend(api.url))
    assert run_pipeline(twice, tmp_path / "twice" / "run") == 1
    failures = lines(tmp_path / "twice" / "run" / "failures.jsonl")
    assert len(failures) == 6 and all(
        f["stage"] == "respond" and f["reason"].startswith("responder: batch API: batch_expired: ") for f in failures
    )
    assert sorted(set(api.stats()["paid"].values())) == [1]  # expired requests are not answered, so not paid
    capsys.readouterr()


def test_a_batch_file_runs_through_vllms_own_batch_runner(tiny_model, tmp_path):
    """The input lines the backend writes are the ones vLLM's offline runner (which reads OpenAI's batch
    format) takes, and its output lines parse back into completions."""
    requests = [ask("Say hi.", seed=1), ask("json", max_tokens=16, json_schema=CHOICE_SCHEMA)]
    batch_in, batch_out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch_in.write_text(
        "".join(json.dumps(input_line(f"r{i}", chat_body(SERVED_NAME, r, True))) + "\n" for i, r in enumerate(requests))
    )
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(batch_in),
        "-o",
        str(batch_out),
        *engine_args(tiny_model),
    ]
    log = tmp_path / "run_batch.log"
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    assert code == 0, log.read_text()[-3000:]
    answers = {line["custom_id"]: line_answer(line) for line in lines(batch_out)}
    assert set(answers) == {"r0", "r1"} and all(reason is None for _, reason in answers.values())
    completions = [parse_completion(answers[f"r{i}"][0]) for i in range(2)]
    assert all(c.ok and c.completion_tokens >= 1 for c in completions)
    assert json.loads(completions[1].text)["choice"] in ("A", "B")  # response_format reached the engine


def test_a_batch_judge_labels_what_an_online_responder_answers(api, tiny_model, tmp_path):
    with CannedServer("--median-s", "0", "--sigma", "0") as online:
        pipeline = tiny_pipeline(
            tmp_path,
            tiny_model,
            backends={
                "online": {"type": "openai", "model": MODEL, "base_url": online.url},
                "b": batch_backend(api.url),
            },
            roles={"responder": "online", "critic": "online", "reviser": "online", "judge": "b"},
            stages=[
                {"type": "respond", "max_tokens": 8},
                {"type": "critique_revise", "rounds": 1, "max_tokens": 8},
                {"type": "compare", "pairing": "initial_vs_revision"},
            ],
        )
        assert run_pipeline(pipeline, tmp_path / "run") == 0
        asked_online = online.stats()["requests"]
    pairs = [p for r in lines(tmp_path / "run" / "datasets" / "rows.jsonl") for p in r["pairs"]]
    assert len(pairs) == 6 and asked_online == 6 * 3  # answers, critiques, revisions
    # the canned judge's A = 0.6 (shown first) in both orders, read from the batches' log-probabilities
    assert all(v["method"] == "logprobs" for p in pairs for v in p["votes"])
    assert sorted({round(v["p_first"], 6) for p in pairs for v in p["votes"]}) == [0.4, 0.6]
    assert sum(api.stats()["paid"].values()) == sum(len(p["votes"]) for p in pairs)


@pytest.mark.parametrize(
    "settings, says",
    [
        ({"batch_size": 0}, "backends.b.batch_size: 0 is less than the minimum of 1"),
        ({"base_url": ["http://127.0.0.1:1/v1"]}, "backends.b.base_url"),
        (
            {"prices": {"input_per_million": 1, "output_per_million": 2, "batch_input_per_million": 1}},
            "batch_output_per_million",
        ),
    ],
    ids=["batch-size", "one-url", "both-batch-prices"],
)
def test_bad_batch_settings_exit_2_naming_the_field(tiny_model, tmp_path, capsys, settings, says):
    pipeline = sl_cai(tmp_path, tiny_model, batch_backend("http://127.0.0.1:1/v1", **settings))
    assert main(["validate", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
