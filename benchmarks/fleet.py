"""Two vLLM OpenAI servers against one, driven by one `cai run` (SL-CAI on the embedded SmolLM2): the
throughput ratio. Each server is the real `vllm.entrypoints.openai.api_server` on 127.0.0.1.

    .venv/bin/python benchmarks/fleet.py [--prompts 48] [--max-tokens 64]

On a machine with one GPU per server (or one node each), two servers double the engine capacity and
the ratio approaches 2 as long as `max_concurrency` keeps both batches full. On one CPU box they
share the cores: the single server gets them all (OpenMP threads = cores), each of the two half.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from api_server import SERVED_NAME, VLLMServer  # noqa: E402
from engine_local import write_prompts  # noqa: E402


def run(urls: list[str], prompts: Path, folder: Path, max_tokens: int, key_env: str) -> tuple[float, int]:
    doc = {
        "name": "fleet",
        "seed": 1,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": str(prompts),
        "backends": {
            "api": {
                "type": "openai",
                "model": SERVED_NAME,
                "base_url": urls,
                "api_key_env": key_env,
                "max_concurrency": 32 * len(urls),
                "timeout_s": 600,
            }
        },
        "roles": {"responder": "api", "critic": "api", "reviser": "api"},
        "stages": [
            {"type": "respond", "max_tokens": max_tokens, "temperature": 0.7},
            {"type": "critique_revise", "max_tokens": max_tokens, "temperature": 0.7},
        ],
    }
    pipeline = folder / f"fleet-{len(urls)}.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cai.cli",
            "run",
            str(pipeline),
            "--run-dir",
            str(folder / f"run-{len(urls)}"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"cai run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    tokens = int(re.search(r"tokens generated: (\d+)", done.stdout).group(1))
    for line in done.stdout.splitlines():
        if "requests," in line:  # the summary's line per server
            print(line, flush=True)
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from api_server import API_KEY

    from cai.core.models import resolve

    os.environ["CAI_BENCH_KEY"] = API_KEY
    cores = os.cpu_count() or 2
    model = Path(resolve("smollm2", []))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = write_prompts(folder / "prompts.jsonl", args.prompts)
        for count in (1, 2):
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // count))  # the servers inherit it
            # a KV cache that holds a full batch of SmolLM2's critique-revision contexts (the tests' 256 MiB do not)
            servers = [
                VLLMServer(model, folder / f"server-{count}-{i}.log", kv_cache_bytes=1 << 30) for i in range(count)
            ]
            try:
                for server in servers:
                    server.wait_healthy()
                figures[count] = run([s.url for s in servers], prompts, folder, args.max_tokens, "CAI_BENCH_KEY")
            finally:
                for server in servers:
                    server.stop()
    (one_s, one_tokens), (two_s, two_tokens) = figures[1], figures[2]
    one, two = one_tokens / one_s, two_tokens / two_s
    print(
        f"one server: {one:.1f} generated tok/s ({one_tokens} tokens, {one_s:.1f} s); two servers: {two:.1f} tok/s ({two_tokens} tokens, {two_s:.1f} s)"
    )
    print(
        f"ratio two / one: {two / one:.2f}  (cores here: {cores}; OpenMP threads: {cores} for the one server, {max(1, cores // 2)} each for two)"
    )


if __name__ == "__main__":
    main()
