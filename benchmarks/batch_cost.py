"""SL-CAI through the Batch API backend against the online backend: requests, tokens and cost per row,
and wall time, on the same prompts and the same scripted answers (tests/canned_server.py online,
tests/batch_server.py as the Batch API, which answers each batch after a declared latency). Both
sides declare the same `prices`, with the Batch API's half-price batch prices; the cost ratio must be
0.5 (the answers, so the tokens, are the same on both sides).

    .venv/bin/python benchmarks/batch_cost.py [--prompts 200] [--concurrency 64] [--batch-latency-s 5] [--batch-size 1000]

A real Batch API answers within its 24 h window, usually in minutes to hours: the declared latency
stands for that; each of SL-CAI's three steps (answer, critique, revision) waits for one batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from api_pipeline import write_pipeline, write_prompts  # noqa: E402
from batch_server import BatchServer  # noqa: E402
from canned_server import MODEL, CannedServer  # noqa: E402

# OpenAI's list prices for gpt-4o-mini per million tokens (2025), online and batch
PRICES = {
    "input_per_million": 0.15,
    "output_per_million": 0.60,
    "batch_input_per_million": 0.075,
    "batch_output_per_million": 0.30,
}


def run(folder: Path, prompts: Path, backend: dict, rows_in_flight: int) -> dict:
    from cai.cli import main

    folder.mkdir()
    pipeline = write_pipeline(folder, prompts, backend["base_url"], 1, max_tokens=16)
    doc = yaml.safe_load(pipeline.read_text())  # api_pipeline's SL-CAI, on this backend
    doc.update(name=folder.name, backends={"api": backend}, rows_in_flight=rows_in_flight)
    pipeline.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = time.perf_counter()
    with open(folder / "summary.txt", "w") as summary, contextlib.redirect_stdout(summary):
        code = main(["run", str(pipeline), "--run-dir", str(folder / "run"), "--quiet"])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{folder.name}: cai run exited {code}")
    figures = json.loads((folder / "run" / "manifest.json").read_text())["invocations"][-1]["backends"]["api"]
    return {"seconds": seconds, **figures}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-latency-s", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = write_prompts(folder, args.prompts)
        with CannedServer("--median-s", "0.2", "--sigma", "0.8") as online:
            online_backend = {
                "type": "openai",
                "model": MODEL,
                "base_url": online.url,
                "max_concurrency": args.concurrency,
                "prices": PRICES,
            }
            ours_online = run(folder / "online", prompts, online_backend, args.concurrency)
            online_requests = online.stats()["requests"]
        with BatchServer() as batches:
            batches.control(latency_s=args.batch_latency_s)
            batch_backend = {
                "type": "openai_batch",
                "model": MODEL,
                "base_url": batches.url,
                "batch_size": args.batch_size,
                "poll_seconds": 0.5,
                "prices": PRICES,
            }
            # a batch holds what is in flight: with as many rows in flight as a batch takes, one batch a step
            ours_batch = run(folder / "batch", prompts, batch_backend, args.batch_size)
            stats = batches.stats()
    n = args.prompts
    print(
        f"SL-CAI, {n} prompts; online: {args.concurrency} requests at once; batch: batches of up to "
        f"{args.batch_size}, answered after {args.batch_latency_s} s"
    )
    print(
        f"  online: {online_requests / n:.2f} requests/row, ${ours_online['cost'] / n * 1e6:.2f} per million rows, "
        f"{ours_online['seconds']:.1f} s"
    )
    print(
        f"  batch:  {sum(stats['paid'].values()) / n:.2f} requests/row in {stats['batches']} batches, "
        f"${ours_batch['cost'] / n * 1e6:.2f} per million rows, {ours_batch['seconds']:.1f} s"
    )
    print(f"  cost ratio batch/online: {ours_batch['cost'] / ours_online['cost']:.3f}")
    tokens = lambda f: (f["prompt_tokens"], f["completion_tokens"])
    print(f"  same tokens on both sides: {tokens(ours_online) == tokens(ours_batch)}")


if __name__ == "__main__":
    main()
