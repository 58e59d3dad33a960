"""The streaming engine against the canned API server (a model adds nothing to these): rows finishing in
any order give the same datasets, kill -9 at any moment loses nothing committed and duplicates nothing,
a huge prompt file is read lazily, and requests are balanced over endpoints by outstanding work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from canned_server import MODEL, CannedServer
from generate.test_pipeline import wait_or_kill
from locations import ROOT

from cai.generate.backends.base import BackendSpec, ChatRequest, start
from cai.generate.store import CallCache, read_shards


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"Prompt number {i}: tell me something."}) + "\n")
    return path


def api_pipeline(folder: Path, urls, prompts: Path, rows_in_flight: int = 64, concurrency: int = 32, **backend) -> Path:
    doc = {
        "name": "stream",
        "seed": 5,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": str(prompts),
        "backends": {
            "api": {
                "type": "openai",
                "model": MODEL,
                "base_url": urls,
                "max_concurrency": concurrency,
                "max_retries": 3,
                **backend,
            }
        },
        "roles": {"responder": "api", "critic": "api", "reviser": "api"},
        "stages": [{"type": "respond", "max_tokens": 8}, {"type": "critique_revise", "rounds": 2, "max_tokens": 8}],
        "rows_in_flight": rows_in_flight,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cai_run(pipeline: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cai.cli", "run", str(pipeline), "--run-dir", str(run_dir), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def dataset_files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / "datasets" / name).read_bytes() for name in ("rows.jsonl", "sft.jsonl")}


def test_rows_finishing_out_of_order_export_the_same_bytes_as_an_in_order_run(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 120)
    with CannedServer("--median-s", "0.001", "--sigma", "0") as steady:
        in_order = api_pipeline(tmp_path, steady.url, prompts, rows_in_flight=1, concurrency=1)
        finish(cai_run(in_order, tmp_path / "in-order"))
    with CannedServer("--median-s", "0.02", "--sigma", "1.5", "--seed", "3") as jittery:  # p99/p1 ~ 1000x
        shuffled = api_pipeline(tmp_path, jittery.url, prompts, rows_in_flight=64, concurrency=32)
        finish(cai_run(shuffled, tmp_path / "shuffled"))
    finished_order = [r["id"] for r in read_shards(tmp_path / "shuffled" / "critique_revise")]
    input_order = [
        json.loads(line)["id"] for line in (tmp_path / "in-order" / "datasets" / "rows.jsonl").read_text().splitlines()
    ]
    assert (
        sorted(finished_order) == sorted(input_order) and finished_order != input_order
    )  # they did finish out of order
    assert dataset_files(tmp_path / "shuffled") == dataset_files(tmp_path / "in-order")


def test_kill_9_at_random_moments_loses_nothing_committed_and_duplicates_nothing(tmp_path):
    rows = 400
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    with CannedServer("--median-s", "0.01", "--sigma", "1.0") as server:
        pipeline = api_pipeline(tmp_path, server.url, prompts)
        finish(cai_run(pipeline, tmp_path / "reference"))
        run_dir = tmp_path / "killed"
        cut_short = 0
        for delay in (0.5, 0.2, 0.8, 0.3):  # after the first, each run resumes the last one's rows
            proc = cai_run(pipeline, run_dir)
            before = sum(1 for _ in read_shards(run_dir / "respond"))
            deadline = time.monotonic() + 120
            while (
                sum(1 for _ in read_shards(run_dir / "respond")) == before
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)  # until this run has finished a row of its own
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            cut_short += sum(1 for _ in read_shards(run_dir / "critique_revise")) < rows
            for stage in ("respond", "critique_revise"):
                ids = [r["id"] for r in read_shards(run_dir / stage)]
                assert not [i for i, n in Counter(ids).items() if n > 1], f"{stage} has a row twice"
        assert cut_short >= 2
        cache = CallCache(run_dir / "calls" / "calls.sqlite")
        committed = len(cache)
        cache.close()
        before = server.stats()["requests"]
        finish(cai_run(pipeline, run_dir))
        sent = server.stats()["requests"] - before
    assert dataset_files(run_dir) == dataset_files(tmp_path / "reference")
    # 400 rows x 5 calls in all: the last run sends none of the calls the killed runs committed
    assert sent <= rows * 5 - committed


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_a_million_line_prompt_file_starts_at_once_and_holds_flat_memory(tmp_path):
    prompts = write_prompts(tmp_path / "million.jsonl", 1_000_000)
    with CannedServer("--median-s", "0.001", "--sigma", "0") as server:
        pipeline = api_pipeline(tmp_path, server.url, prompts, rows_in_flight=32)
        run_dir = tmp_path / "run"
        proc = cai_run(pipeline, run_dir)
        samples = {}
        try:
            deadline = time.monotonic() + 300
            while len(samples) < 2 and time.monotonic() < deadline and proc.poll() is None:
                done = sum(1 for _ in read_shards(run_dir / "critique_revise"))
                if done >= 200 and 200 not in samples:
                    samples[200] = vm_rss_kib(proc.pid)
                if done >= 1000:
                    samples[1000] = vm_rss_kib(proc.pid)
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGINT)
            wait_or_kill(proc, 60)
    assert set(samples) == {200, 1000}, f"rows did not flow: {proc.stderr.read()[-2000:]}"
    assert samples[1000] - samples[200] < 30 * 1024, samples  # KiB: the 800 rows between hold no memory


def test_least_outstanding_balancing_prefers_the_fast_endpoint():
    with (
        CannedServer("--median-s", "0.005", "--sigma", "0") as fast,
        CannedServer("--median-s", "0.2", "--sigma", "0") as slow,
    ):
        counts = asyncio.run(_send(200, [fast.url, slow.url], max_concurrency=16))
        assert counts[fast.url]["requests"] > 4 * counts[slow.url]["requests"], counts


def test_a_failing_endpoint_is_set_aside_and_its_rows_served_by_the_other():
    with CannedServer("--median-s", "0.005", "--sigma", "0") as good, CannedServer("--fail-rate", "1.0") as bad:
        counts = asyncio.run(_send(200, [bad.url, good.url], max_concurrency=8, max_retries=3))
        assert counts["ok"] == 200  # no request failed: each retry went to the healthy endpoint
        assert counts[bad.url]["set_aside"] >= 1 and counts[bad.url]["requests"] < 40, counts
        assert bad.stats()["failed"] == counts[bad.url]["errors"]


async def _send(n: int, urls: list[str], **settings) -> dict:
    spec = BackendSpec(name="api", type="openai", model=MODEL, settings={"base_url": urls, **settings})
    backend = await start(spec)
    try:
        out = await asyncio.gather(
            *(
                backend.complete(ChatRequest(messages=({"role": "user", "content": f"q{i}"},), max_tokens=4))
                for i in range(n)
            )
        )
        stats = {e["url"]: e for e in backend.endpoint_stats()}
        return {**{url.removesuffix("/v1") + "/v1": stats[url] for url in urls}, "ok": sum(c.ok for c in out)}
    finally:
        await backend.close()


def test_runs_from_inside_a_running_event_loop_as_a_notebook_would(tmp_path):
    from cai.generate import config, pipeline

    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    with CannedServer("--median-s", "0.002", "--sigma", "0") as server:
        cfg = config.load(api_pipeline(tmp_path, server.url, prompts))

        async def notebook_cell():
            blocking = pipeline.run(cfg, run_dir=tmp_path / "blocking", show_progress=False)  # inside a running loop
            awaited = await pipeline.arun(cfg, run_dir=tmp_path / "awaited", show_progress=False)
            return blocking, awaited

        blocking, awaited = asyncio.run(notebook_cell())
    assert blocking.ok and awaited.ok and blocking.stages[-1].done == awaited.stages[-1].done == 20
    assert dataset_files(tmp_path / "blocking") == dataset_files(tmp_path / "awaited")


def test_a_rerun_that_finishes_nothing_new_keeps_the_datasets_and_a_smaller_limit_rewrites_them(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 30)
    with CannedServer("--median-s", "0.001", "--sigma", "0") as server:
        pipeline = api_pipeline(tmp_path, server.url, prompts)
        run_dir = tmp_path / "run"
        finish(cai_run(pipeline, run_dir))
        written = (run_dir / "datasets" / "rows.jsonl").stat().st_mtime_ns
        again = cai_run(pipeline, run_dir)
        out, _ = again.communicate(timeout=300)
        assert again.returncode == 0 and "unchanged since the last run, kept" in out
        assert (run_dir / "datasets" / "rows.jsonl").stat().st_mtime_ns == written
        finish(cai_run(pipeline, run_dir, "--limit", "10"))
    assert len((run_dir / "datasets" / "rows.jsonl").read_text().splitlines()) == 10


def test_each_invocation_records_its_figures_and_the_report_shows_them_with_the_cost(tmp_path):
    from cai.judge import report

    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    with CannedServer("--median-s", "0.001", "--sigma", "0") as server:
        pipeline = api_pipeline(
            tmp_path, server.url, prompts, prices={"input_per_million": 3.0, "output_per_million": 15.0}
        )
        finish(cai_run(pipeline, tmp_path / "run", "--limit", "12"))
        finish(cai_run(pipeline, tmp_path / "run"))  # skips the 12 finished rows, makes 8 new ones
    first, second = json.loads((tmp_path / "run" / "manifest.json").read_text())["invocations"]
    assert first["rows"] == 12 and second["rows"] == 20 and first["failed"] == second["failed"] == 0
    assert first["stages"]["critique_revise"]["new"] == 12 and second["stages"]["critique_revise"]["new"] == 8
    for invocation in (first, second):
        api = invocation["backends"]["api"]
        assert api["completion_tokens"] > 0 and api["prompt_tokens"] > 0 and api["cached_calls"] == 0
        assert api["cost"] == pytest.approx((3.0 * api["prompt_tokens"] + 15.0 * api["completion_tokens"]) / 1e6)
    # 8 rows cost 8/12 of 12 rows, up to the prompts' lengths
    assert second["backends"]["api"]["completion_tokens"] == pytest.approx(
        first["backends"]["api"]["completion_tokens"] * 8 / 12, rel=0.2
    )
    page = report.write(tmp_path / "run").read_text()
    total = first["backends"]["api"]["cost"] + second["backends"]["api"]["cost"]
    assert "<h2>Run figures</h2>" in page and f"API cost of the run: ${total:.4f}" in page
    assert page.index("Run figures") < page.index("<h2>Samples</h2>")
