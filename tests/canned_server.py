"""A canned OpenAI-compatible chat server for orchestration benchmarks and latency/ordering tests only
(where a model adds nothing): it answers after a delay drawn from a lognormal distribution, with text
derived from the request, optional log-probabilities, usage, per-minute rate limits enforced with 429s,
and failures at a chosen rate. Plain asyncio HTTP/1.1 with keep-alive, so it is never the bottleneck.
With `--prefer shorter`, it is a scripted judge: asked the compare stage's question, it gives the letter
of the shorter response probability 0.9 (in either order), a rule tests of ratings can check.

    python tests/canned_server.py --port 0 --median-s 0.2 --sigma 0.8 [--rpm N] [--tpm N] [--fail-rate p] [--prefer shorter]

prints `listening PORT` on its first line; GET /stats gives the requests it saw, their times and 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import time

MODEL = "canned"
RESPONSES = re.compile(r"<response_a>\n(.*)\n</response_a>.*<response_b>\n(.*)\n</response_b>", re.DOTALL)


def letter_probabilities(last: str, prefer: str | None) -> tuple[tuple[str, float], tuple[str, float]]:
    """The judge's option probabilities: by the scripted rule when the message is a comparison of two
    responses, else a fixed pull towards A."""
    found = RESPONSES.search(last) if prefer == "shorter" else None
    if found is None:
        return ("A", 0.6), ("B", 0.4)
    first, second = (len(text) for text in found.groups())
    return (("A", 0.9), ("B", 0.1)) if first < second else (("B", 0.9), ("A", 0.1))


class Bucket:
    """A minute's worth of units, refilled continuously: what hosted APIs enforce."""

    def __init__(self, per_minute: float):
        self.capacity = per_minute
        self.level = per_minute
        self.rate = per_minute / 60
        self.updated = time.monotonic()

    def take(self, amount: float) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < amount:
            return False
        self.level -= amount
        return True


class Canned:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.rpm = Bucket(args.rpm) if args.rpm else None
        self.tpm = Bucket(args.tpm) if args.tpm else None
        self.times: list[float] = []  # when each answered request arrived
        self.token_counts: list[int] = []  # and the tokens it counted against the limit
        self.rejected = 0
        self.failed = 0

    def delay(self) -> float:
        return (
            self.args.median_s * math.exp(self.args.sigma * self.rng.gauss(0, 1))
            if self.args.sigma
            else self.args.median_s
        )

    async def answer(self, path: str, body: bytes) -> tuple[int, dict, dict]:
        if path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}, {}
        if path.endswith("/stats"):
            return (
                200,
                {
                    "requests": len(self.times),
                    "times": self.times,
                    "token_counts": self.token_counts,
                    "rejected": self.rejected,
                    "failed": self.failed,
                },
                {},
            )
        request = json.loads(body)
        prompt_tokens = sum(len(m["content"]) for m in request["messages"]) // 4 + 1
        n = request.get("n", 1)
        completion_tokens = min(request.get("max_tokens", 16), self.args.answer_tokens) * n
        used = prompt_tokens + completion_tokens
        if (self.rpm and not self.rpm.take(1)) or (self.tpm and not self.tpm.take(used)):
            self.rejected += 1
            return 429, {"error": {"message": "rate limit exceeded"}}, {"Retry-After": "1"}
        if self.args.fail_rate and self.rng.random() < self.args.fail_rate:
            self.failed += 1
            await asyncio.sleep(self.args.fail_delay_s)
            return 500, {"error": {"message": "canned failure"}}, {}
        self.times.append(time.time())
        self.token_counts.append(used)
        await asyncio.sleep(self.delay())
        last = request["messages"][-1]["content"]
        text = f"canned answer to: {last[:60]}"
        choice_logprobs = None
        if request.get("logprobs"):
            options = letter_probabilities(last, self.args.prefer)
            top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in options]
            choice_logprobs = {"content": [{**top[0], "top_logprobs": top}]}
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
                "logprobs": choice_logprobs,
            }
            for i in range(n)
        ]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": used}
        return (
            200,
            {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL, "choices": choices, "usage": usage},
            {},
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0))) if method == "POST" else b""
                status, payload, extra = await self.answer(path, body)
                data = json.dumps(payload).encode()
                reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
                extra_headers = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra_headers}\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class CannedServer:
    """The server as a process of its own (so it never shares an event loop or a core's time slices
    with the client it serves)."""

    def __init__(self, *args: str):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/stats", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "CannedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def main(args) -> None:
    canned = Canned(args)
    server = await asyncio.start_server(canned.handle, "127.0.0.1", args.port, backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--median-s", type=float, default=0.2)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--rpm", type=float)
    p.add_argument("--tpm", type=float)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-delay-s", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefer", choices=["shorter"], help="judge comparisons by a scripted rule")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
