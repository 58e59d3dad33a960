"""Requests/s through cai's OpenAI-compatible backend against the real vLLM server at concurrency 1, 8
and 32, and the ratio to a bare AsyncOpenAI loop sending the same requests at the same concurrency.

    .venv/bin/python benchmarks/api_throughput.py [--model smollm2|tiny] [--requests 64] [--max-tokens 16]

The default model is the tiny random one the tests build: the server answers fast, so the client's
own overhead shows the most. Passes alternate between the two clients; the best of --repeats is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


async def bare_loop(url: str, key: str, model: str, requests, concurrency: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(r):
        async with semaphore:
            await client.chat.completions.create(
                model=model, messages=list(r.messages), max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed
            )

    try:
        await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import os

    from api_server import API_KEY, SERVED_NAME, VLLMServer
    from conftest import corpus
    from tiny_model import build_tiny_model

    from cai.core.models import prepare
    from cai.generate.backends import BackendSpec, ChatRequest, create

    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-"))
    model = prepare("smollm2") if args.model == "smollm2" else build_tiny_model(tmp / "tiny", corpus())
    server = VLLMServer(model, tmp / "server.log")
    try:
        server.wait_healthy()
        os.environ["CAI_BENCH_KEY"] = API_KEY
        requests = [
            ChatRequest(
                messages=({"role": "user", "content": f"Request {i}: say something."},),
                max_tokens=args.max_tokens,
                temperature=0.7,
                seed=i,
            )
            for i in range(args.requests)
        ]
        print(f"{args.requests} requests, max_tokens {args.max_tokens}, model {args.model}, best of {args.repeats}")
        print(f"{'concurrency':>11} {'bare req/s':>11} {'cai req/s':>10} {'cai/bare':>9}")
        for concurrency in (1, 8, 32):
            settings = {"base_url": server.url, "api_key_env": "CAI_BENCH_KEY", "max_concurrency": concurrency}
            backend = create(BackendSpec(name="api", type="openai", model=SERVED_NAME, settings=settings))
            asyncio.run(bare_loop(server.url, API_KEY, SERVED_NAME, requests[:4], concurrency))  # warm the server
            bare, cai = 0.0, 0.0
            for _ in range(args.repeats):
                started = time.perf_counter()
                asyncio.run(bare_loop(server.url, API_KEY, SERVED_NAME, requests, concurrency))
                bare = max(bare, len(requests) / (time.perf_counter() - started))
                started = time.perf_counter()
                out = backend.complete(requests)
                cai = max(cai, len(requests) / (time.perf_counter() - started))
                assert all(c.ok for c in out), [c.error for c in out if not c.ok][:3]
            print(f"{concurrency:>11} {bare:>11.2f} {cai:>10.2f} {cai / bare:>9.3f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
