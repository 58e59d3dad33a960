"""The OpenAI-compatible backend against the real vLLM server (through a fault-injecting proxy where
the test is about faults). No mock of the API anywhere."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_server import API_KEY, KEY_ENV, SERVED_NAME, running
from fault_proxy import FaultProxy
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate.backends import BackendSpec, ChatRequest, create
from cai.generate.backends.openai_api import TokenBucket, backoff_delay
from cai.generate.store import CallCache, read_shards


@pytest.fixture
def server(tiny_api_server):
    return tiny_api_server


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)


def api_backend(url: str, **settings) -> dict:
    return {
        "type": "openai",
        "model": SERVED_NAME,
        "base_url": url,
        "api_key_env": KEY_ENV,
        "max_concurrency": 8,
        **settings,
    }


def spec(url: str, **settings) -> BackendSpec:
    b = api_backend(url, **settings)
    return BackendSpec(
        name="api",
        type="openai",
        model=SERVED_NAME,
        settings={k: v for k, v in b.items() if k not in ("type", "model")},
    )


def ask(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": text},), **{"max_tokens": 8, **kw})


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_batch_with_usage(server):
    backend = create(spec(server.url))
    out = backend.complete([ask(f"question {i}") for i in range(5)] + [ask("sample", temperature=1.0, seed=3, n=2)])
    assert all(c.ok for c in out)
    assert all(c.completion_tokens == 8 for c in out[:5]) and out[5].completion_tokens == 16
    assert len(out[5].texts) == 2 and all(c.prompt_tokens > 3 for c in out)


def test_requests_spread_over_several_base_urls(server):
    proxies = [FaultProxy(server.port), FaultProxy(server.port)]
    try:
        backend = create(spec(server.url, base_url=[p.url for p in proxies]))
        assert all(c.ok for c in backend.complete([ask(f"q{i}") for i in range(8)]))
        assert [len(p.forwarded) for p in proxies] == [4, 4]
    finally:
        for p in proxies:
            p.close()


def test_client_errors_fail_at_once_with_the_servers_message(server):
    out = create(spec(server.url)).complete([ask("word " * 3000), ask("fine")])
    assert not out[0].ok and out[0].error.startswith("HTTP 400:") and "gave up" not in out[0].error
    assert out[1].ok


@pytest.mark.parametrize(
    "url, settings, says",
    [
        ("http://127.0.0.1:9/v1", {}, "cannot reach http://127.0.0.1:9/v1"),
        (None, {"api_key_env": "CAI_TEST_WRONG_KEY"}, "refused the API key from $CAI_TEST_WRONG_KEY (HTTP 401)"),
        (
            None,
            {"api_key_env": "CAI_TEST_UNSET_KEY"},
            "environment variable CAI_TEST_UNSET_KEY (api_key_env) is not set",
        ),
        (None, {"model": "no-such-model"}, "does not serve model 'no-such-model' (it serves: tiny)"),
    ],
    ids=["wrong-url", "wrong-key", "unset-key", "unknown-model"],
)
def test_start_check_fails_in_one_line_before_any_row(
    server, tiny_model, tmp_path, capsys, monkeypatch, url, settings, says
):
    monkeypatch.setenv("CAI_TEST_WRONG_KEY", "sk-wrong")
    backend = api_backend(url or server.url, **settings)
    pipeline = tiny_pipeline(
        tmp_path, tiny_model, backends={"api": backend}, roles={"responder": "api", "critic": "api", "reviser": "api"}
    )
    run_dir = tmp_path / "run"
    assert main(["run", str(pipeline), "--limit", "2", "--run-dir", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed to start" in err and says in err
    assert not (run_dir / "respond").exists()


def run_pipeline(tmp_path: Path, model: Path, backend: dict, name: str, *args: str) -> tuple[int, Path]:
    folder = tmp_path / name
    folder.mkdir()
    pipeline = tiny_pipeline(
        folder, model, rounds=1, backends={"b": backend}, roles={"responder": "b", "critic": "b", "reviser": "b"}
    )
    run_dir = folder / "run"
    return main(["run", str(pipeline), "--run-dir", str(run_dir), "--quiet", *args]), run_dir


def test_parity_with_the_local_engine_at_temperature_zero(server, tiny_model, tmp_path):
    greedy = ["--limit", "6", "--set", "stages.0.temperature=0", "--set", "stages.1.temperature=0"]
    local = {
        "type": "vllm",
        "model": str(tiny_model),
        "options": {"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
    }
    code_local, local_dir = run_pipeline(tmp_path, tiny_model, local, "local", *greedy)
    code_api, api_dir = run_pipeline(tmp_path, tiny_model, api_backend(server.url), "api", *greedy)
    assert code_local == code_api == 0
    texts = lambda d: [(r["response"], r["rounds"]) for r in lines(d / "datasets" / "rows.jsonl")]
    assert texts(api_dir) == texts(local_dir)
    assert [r["principle_ids"] for r in lines(api_dir / "datasets" / "rows.jsonl")] == [
        r["principle_ids"] for r in lines(local_dir / "datasets" / "rows.jsonl")
    ]


def test_flaky_server_loses_no_row_and_resume_retries_only_failures(server, tiny_model, tmp_path, capsys):
    proxy = FaultProxy(server.port, rate=0.3, seed=1, stall_s=4.0)
    try:
        backend = api_backend(proxy.url, timeout_s=2.0, max_retries=2)
        code, run_dir = run_pipeline(tmp_path, tiny_model, backend, "flaky", "--limit", "16")
        assert set(proxy.injected) == {"429", "500", "503", "stall", "drop", "truncate"}
        rows = [r["id"] for r in lines(run_dir / "datasets" / "rows.jsonl")]
        failed = {f["id"] for f in lines(run_dir / "failures.jsonl")}
        assert len(rows) == len(set(rows)) and not failed & set(rows)
        assert len(rows) + len(failed) == 16  # every input row is somewhere, once
        assert code == (1 if failed else 0)
        assert all("gave up after 3 attempts" in f["reason"] for f in lines(run_dir / "failures.jsonl"))

        calls_before = cached_calls(run_dir)
        proxy.rate, proxy.forwarded = 0.0, []
        code, run_dir = run_pipeline_again(run_dir)
        assert code == 0
        # only calls that never succeeded went to the server again
        assert len(proxy.forwarded) == cached_calls(run_dir) - calls_before
        assert len(proxy.forwarded) <= 3 * len(failed)
        assert len(lines(run_dir / "datasets" / "rows.jsonl")) == 16
    finally:
        proxy.close()
    capsys.readouterr()


def test_killed_run_does_not_resend_calls_that_finished(server, tiny_model, tmp_path):
    proxy = FaultProxy(server.port, delay_s=0.3)
    try:
        backend = api_backend(proxy.url, max_concurrency=2)
        pipeline = tiny_pipeline(
            tmp_path,
            tiny_model,
            rounds=1,
            rows_in_flight=16,
            backends={"api": backend},
            roles={"responder": "api", "critic": "api", "reviser": "api"},
        )
        run_dir = tmp_path / "run"
        argv = ["run", str(pipeline), "--limit", "16", "--run-dir", str(run_dir), "--quiet"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cai.cli", *argv], start_new_session=True, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while len(proxy.forwarded) < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sum(1 for _ in read_shards(run_dir / "critique_revise"))
        kept = cached_calls(run_dir)
        assert kept >= 2 and done < 16  # killed mid-run, with calls committed (every 0.2 s)
        proxy.forwarded = []
        assert main(argv) == 0
        # 16 answers, 16 critiques, 16 revisions in all: none that was committed is sent again (a row
        # whose record was written needs no call at all, even one the kill kept from the cache)
        assert 0 < len(proxy.forwarded) <= 16 * 3 - kept
    finally:
        proxy.close()


def cached_calls(run_dir: Path) -> int:
    cache = CallCache(run_dir / "calls" / "calls.sqlite")
    try:
        return len(cache)
    finally:
        cache.close()


def run_pipeline_again(run_dir: Path) -> tuple[int, Path]:
    pipeline = run_dir.parent / "tiny.yaml"
    return main(["run", str(pipeline), "--run-dir", str(run_dir), "--quiet", "--limit", "16"]), run_dir


def test_a_row_that_always_fails_is_reported_not_dropped(server, tiny_model, tmp_path, capsys):
    proxy = FaultProxy(server.port)
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["Hi.", "ALWAYS_FAIL here", "Bye."])
            )
        )
        pipeline = tiny_pipeline(
            tmp_path,
            tiny_model,
            rounds=1,
            prompts=[str(prompts)],
            backends={"api": api_backend(proxy.url, max_retries=2)},
            roles={"responder": "api", "critic": "api", "reviser": "api"},
        )
        assert main(["run", str(pipeline), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 1
        assert "rows done: 2/3, rows failed: 1" in capsys.readouterr().out
        [failure] = lines(tmp_path / "run" / "failures.jsonl")
        assert failure["reason"] == "responder: gave up after 3 attempts: HTTP 500: injected 500"
        assert proxy.injected["500"] == 3
    finally:
        proxy.close()


def test_the_key_never_reaches_disk_or_output(server, tiny_model, tmp_path, capsys):
    code, run_dir = run_pipeline(tmp_path, tiny_model, api_backend(server.url), "secrets", "--limit", "3")
    assert code == 0
    captured = capsys.readouterr()
    assert (
        "tokens generated: " in captured.out and "(prompt tokens: 0)" not in captured.out
    )  # usage reaches the summary
    assert API_KEY not in captured.out + captured.err
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert KEY_ENV in (run_dir / "manifest.json").read_text()  # the variable's name is recorded, not its value


def test_choice_logprobs_match_the_local_engine(server, tiny_model):
    import openai

    request = ask("Answer with one letter.")
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY)
    raw = client.chat.completions.create(
        model=SERVED_NAME, messages=list(request.messages), max_tokens=1, temperature=0, logprobs=True, top_logprobs=10
    )
    # At temperature 0 the list is the top 10 (vLLM puts a sampled token first, which at 1.0 may lie outside)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    top = [t.token for t in raw.choices[0].logprobs.content[0].top_logprobs]
    # tokens that decode to text and encode back to themselves (not a byte fragment or '')
    single = [t for t in top if len(tokenizer.encode(t, add_special_tokens=False)) == 1]
    choices = single[:2] + ["not-a-single-token-choice"]
    api = create(spec(server.url)).choice_logprobs([request], choices)[0]
    local = create(
        BackendSpec(
            name="l",
            type="vllm",
            model=str(tiny_model),
            options={"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
        )
    )
    try:
        exact = local.choice_logprobs([request], choices[:2])[0]
    finally:
        local.close()
    for choice in choices[:2]:
        assert math.isclose(api[choice], exact[choice], abs_tol=1e-3), (choice, api[choice], exact[choice])
    assert api["not-a-single-token-choice"] == float("-inf")


def test_token_bucket_paces_after_the_burst():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one a second, bursts of 60
    for _ in range(60):
        assert bucket.wait_time(1) == 0
        bucket.take(1)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    now[0] = 0.5
    assert bucket.wait_time(1) == pytest.approx(0.5)
    assert bucket.wait_time(1000) == pytest.approx(59.5)  # more than the capacity waits for a full bucket


def test_backoff_honours_retry_after_and_caps():
    import random

    rng = random.Random(0)
    assert all(0 <= backoff_delay(a, None, 30, rng) <= min(30, 0.5 * 2**a) for a in range(10))
    assert backoff_delay(0, 7.0, 30, rng) == 7.0


def test_reaching_the_server_differently_resumes_the_same_run(tiny_model, tmp_path):
    from cai.generate import config
    from cai.generate.pipeline import fingerprint

    def fp(**settings):
        path = tiny_pipeline(
            tmp_path,
            tiny_model,
            backends={"api": api_backend("http://127.0.0.1:1/v1", **settings)},
            roles={"responder": "api", "critic": "api", "reviser": "api"},
        )
        return fingerprint(config.load(path))

    assert fp() == fp(base_url=["http://127.0.0.2:9/v1", "http://127.0.0.3:9/v1"], max_concurrency=64, timeout_s=5)
    assert fp() != fp(model="another-model")


def test_unanswerable_judge_calls_fail_their_rows_not_the_run(server, tiny_model, tmp_path, capsys):
    proxy = FaultProxy(server.port, always_fail_marker="top_logprobs")  # only the judge's scoring calls
    try:
        backend = api_backend(proxy.url, max_retries=1)
        pipeline = tiny_pipeline(
            tmp_path,
            tiny_model,
            rows_in_flight=2,
            backends={"api": backend},
            roles={"responder": "api", "judge": "api"},
            stages=[
                {"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0},
                {"type": "compare", "swap": False},
            ],
        )
        assert main(["run", str(pipeline), "--limit", "4", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 1
        assert "rows done: 0/4, rows failed: 4" in capsys.readouterr().out
        failures = lines(tmp_path / "run" / "failures.jsonl")
        assert len(failures) == 4 and all(
            f["stage"] == "compare" and "choice log-probabilities failed" in f["reason"] for f in failures
        )
    finally:
        proxy.close()


def test_json_schema_goes_to_the_server_as_response_format(server):
    from cai.generate.stages.compare import CHOICE_SCHEMA, parse_choice

    backend = create(spec(server.url))
    out = backend.complete([ask(f"which one? {i}", max_tokens=16, json_schema=CHOICE_SCHEMA) for i in range(4)])
    assert all(parse_choice(c.text) in ("A", "B") for c in out), [c.text for c in out]
    plain = create(spec(server.url, structured_output=False)).complete([ask("which one? 0", max_tokens=16)])
    assert plain[0].ok  # switched off, the schema is not sent (servers that reject response_format)


def test_a_server_without_logprobs_gets_parsed_choices_marked_as_such(server, tiny_model, tmp_path):
    proxy = FaultProxy(server.port, strip_logprobs=True)
    try:
        pipeline = tiny_pipeline(
            tmp_path,
            tiny_model,
            backends={"api": api_backend(proxy.url)},
            roles={"responder": "api", "judge": "api"},
            stages=[
                {"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0},
                {"type": "compare", "tie_threshold": 0.0},
            ],
        )
        assert main(["run", str(pipeline), "--limit", "3", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
        pairs = [p for r in lines(tmp_path / "run" / "datasets" / "rows.jsonl") for p in r["pairs"]]
        assert pairs and all(p["method"] == "parsed" and p["label"] in ("a", "b", "tie") for p in pairs)
        # every vote is a stated choice: 1.0 or 0.0 for the first answer, averaged over the two orders
        assert all(v["p_first"] in (0.0, 1.0) for p in pairs for v in p["votes"])
        asked = [json.loads(b) for b in proxy.forwarded if b"response_format" in b]
        assert len(asked) == 2 * len(pairs) and all(a["response_format"]["type"] == "json_schema" for a in asked)
        records = lines(tmp_path / "run" / "datasets" / "preferences.jsonl")
        assert all(r["label_method"] == "parsed" for r in records)
    finally:
        proxy.close()


def test_one_run_drives_a_fleet_of_two_real_servers(server, tiny_model, tmp_path, capsys):
    """Scaling out: each server started by the user's own tooling, one `cai run` spreads rows over both,
    and the datasets are the ones a single server gives (same model, same per-request seeds)."""
    with running(tiny_model, tmp_path / "second-server.log") as second:
        fleet = api_backend([server.url, second.url], max_concurrency=16)
        code_fleet, fleet_dir = run_pipeline(tmp_path, tiny_model, fleet, "fleet", "--limit", "12")
        out = capsys.readouterr().out
        code_one, one_dir = run_pipeline(
            tmp_path, tiny_model, api_backend(server.url, max_concurrency=16), "one", "--limit", "12"
        )
    assert code_fleet == code_one == 0
    served = {url: int(n) for url, n in re.findall(r"(http://127\.0\.0\.1:\d+/v1): (\d+) requests, 0 errors", out)}
    # both served (the fresh server's first requests are slow while it warms up, so it gets fewer)
    assert set(served) == {server.url, second.url} and all(n >= 1 for n in served.values()), out
    assert sum(served.values()) == 12 * 3
    for name in ("rows.jsonl", "sft.jsonl"):
        assert (fleet_dir / "datasets" / name).read_text() == (one_dir / "datasets" / name).read_text()
