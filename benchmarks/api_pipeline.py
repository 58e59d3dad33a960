"""SL-CAI over an OpenAI-compatible API: `cai run` against the best a skilled engineer writes by hand, a
per-row asyncio chain (respond -> critique -> revise for each row, every row at once under one
semaphore, one client), on the same canned server and the same prompts. Prints requests/s of both
and their ratio, measured in one run with the sides alternated.

    .venv/bin/python benchmarks/api_pipeline.py [--prompts 1000] [--concurrency 64] [--median-s 0.2] [--sigma 0.8] [--rounds 2]

The server (tests/canned_server.py, a process of its own) answers after a lognormal delay (median
0.2 s, sigma 0.8 by default: the spread hosted APIs show). Rates are the server's own count: requests
between the first and the last it received, so process start-up is left out on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from canned_server import MODEL, CannedServer  # noqa: E402

CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_prompts(folder: Path, n: int) -> Path:
    path = folder / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"id": i, "prompt": f"Question {i}: how would you answer a user who asks for something risky?"}
                )
                + "\n"
            )
    return path


def write_pipeline(folder: Path, prompts: Path, url: str, concurrency: int, max_tokens: int) -> Path:
    doc = {
        "name": "bench-api",
        "seed": 1,
        "constitution": str(CONSTITUTION),
        "prompts": str(prompts),
        "backends": {
            "api": {"type": "openai", "model": MODEL, "base_url": url, "max_concurrency": concurrency, "max_retries": 2}
        },
        "roles": {"responder": "api", "critic": "api", "reviser": "api"},
        "stages": [
            {"type": "respond", "max_tokens": max_tokens, "temperature": 0.7},
            {"type": "critique_revise", "rounds": 1, "max_tokens": max_tokens},
        ],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def hand_chain(url: str, prompts: Path, concurrency: int, max_tokens: int) -> int:
    """What a user would write instead of a framework: every row's three calls chained, all rows at once."""
    import openai

    from cai.core.seeding import rng
    from cai.generate import constitution

    principles = constitution.load(CONSTITUTION)
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=2)
    semaphore = asyncio.Semaphore(concurrency)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]

    async def ask(messages, temperature):
        async with semaphore:
            response = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens, temperature=temperature
            )
        return response.choices[0].message.content

    async def chain(row) -> None:
        principle = principles.draw(rng(1, row["id"]))
        messages = [{"role": "user", "content": row["prompt"]}]
        answer = await ask(messages, 0.7)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": principle.critique}]
        critique = await ask(messages, 0.0)
        messages += [{"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]
        await ask(messages, 0.0)

    try:
        await asyncio.gather(*(chain(row) for row in rows))
    finally:
        await client.close()
    return len(rows) * 3


def server_rate(stats: dict) -> float:
    times = stats["times"]
    return (len(times) - 1) / (max(times) - min(times))


def run_side(side: str, args, folder: Path, prompts: Path) -> dict:
    server_args = ["--median-s", str(args.median_s), "--sigma", str(args.sigma), "--seed", "0"]
    with CannedServer(*server_args) as server:
        started = time.perf_counter()
        if side == "cai":
            pipeline = write_pipeline(folder, prompts, server.url, args.concurrency, args.max_tokens)
            run_dir = folder / f"run-{time.monotonic_ns()}"
            done = subprocess.run(
                [sys.executable, "-m", "cai.cli", "run", str(pipeline), "--run-dir", str(run_dir), "--quiet"],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                sys.exit(f"cai run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        else:
            code = (
                f"import asyncio, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from api_pipeline import hand_chain; from pathlib import Path; "
                f"asyncio.run(hand_chain({server.url!r}, Path({str(prompts)!r}), {args.concurrency}, {args.max_tokens}))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"hand chain failed:\n{done.stderr[-3000:]}")
        wall = time.perf_counter() - started
        stats = server.stats()
    expected = args.prompts * 3
    if stats["requests"] != expected:
        sys.exit(f"{side}: the server saw {stats['requests']} requests, {expected} expected")
    return {"requests_per_s": server_rate(stats), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--median-s", type=float, default=0.2)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternated")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"cai": [], "hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = write_prompts(folder, args.prompts)
        for round_ in range(args.rounds):
            for side in ("cai", "hand") if round_ % 2 == 0 else ("hand", "cai"):
                result = run_side(side, args, folder, prompts)
                results[side].append(result)
                print(
                    f"round {round_ + 1} {side:<4} {result['requests_per_s']:.1f} requests/s (server's count), {result['wall_s']:.1f} s wall",
                    flush=True,
                )
    rate = {side: statistics.median(r["requests_per_s"] for r in runs) for side, runs in results.items()}
    print(
        f"requests/s (median of rounds): cai run {rate['cai']:.1f}, hand-written per-row chain {rate['hand']:.1f}  ->  ratio {rate['cai'] / rate['hand']:.3f}"
    )


if __name__ == "__main__":
    main()
