"""Declared rate limits are used, not wasted, and never exceeded: `cai run` (SL-CAI) against the canned
API server, which enforces a limit 2% above the declared one (a minute's bucket, refilled
continuously, as hosted APIs do) and answers 429 past it, while it could serve far more. Once with
`requests_per_minute`, once with `tokens_per_minute` (answers use fewer tokens than `max_tokens`
budgets, so the estimates are corrected by the usage the server reports). Prints the achieved rate
over the whole run and after its first minute, as a share of the declared one, and the 429s.

    .venv/bin/python benchmarks/rate_limits.py [--minutes 3] [--rpm 900] [--tpm 60000]

Target: achieved >= 95% of the declared rate, no 429.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from api_pipeline import write_prompts  # noqa: E402
from canned_server import MODEL, CannedServer  # noqa: E402


def measure(kind: str, limit: float, minutes: float, folder: Path) -> None:
    per_row = 3  # respond, critique, revise
    max_tokens, answer_tokens = 64, 16
    # enough rows to keep the limit busy for the whole time (the run is stopped then)
    rows = int(limit * minutes * 2 / (per_row if kind == "requests" else 30)) + 100
    prompts = write_prompts(folder, rows)
    backend = {"type": "openai", "model": MODEL, "max_concurrency": 64, "max_retries": 0, f"{kind}_per_minute": limit}
    server_flag = "--rpm" if kind == "requests" else "--tpm"
    server_limit = limit * 1.02  # the server allows a little more than declared: the declared limit is the one to keep
    with CannedServer(
        "--median-s", "0.005", "--sigma", "0", server_flag, str(server_limit), "--answer-tokens", str(answer_tokens)
    ) as server:
        backend["base_url"] = server.url
        doc = {
            "name": f"rate-{kind}",
            "seed": 1,
            "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
            "prompts": str(prompts),
            "backends": {"api": backend},
            "roles": {"responder": "api", "critic": "api", "reviser": "api"},
            "stages": [
                {"type": "respond", "max_tokens": max_tokens},
                {"type": "critique_revise", "max_tokens": max_tokens},
            ],
        }
        pipeline = folder / f"{kind}.yaml"
        pipeline.write_text(yaml.safe_dump(doc))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cai.cli",
                "run",
                str(pipeline),
                "--run-dir",
                str(folder / f"run-{kind}"),
                "--quiet",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(minutes * 60 + 5)
        proc.kill()
        proc.wait()
        stats = server.stats()
    times = stats["times"]
    start, end = min(times), max(times)
    counts = [1] * len(times) if kind == "requests" else stats["token_counts"]
    total, after_first = sum(counts), sum(c for t, c in zip(times, counts) if t >= start + 60)
    minutes_run = (end - start) / 60
    achieved = total / minutes_run
    print(
        f"{kind}_per_minute {limit:.0f}: achieved {achieved:.0f} a minute over {minutes_run:.2f} min ({achieved / limit:.1%} of declared), 429s: {stats['rejected']}"
    )
    if end - start > 90:
        steady = after_first / ((end - start - 60) / 60)
        print(
            f"  after the first minute (the burst a full bucket allows): {steady:.0f} a minute ({steady / limit:.1%} of declared)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rpm", type=float, default=900)
    parser.add_argument("--tpm", type=float, default=60000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, limit in (("requests", args.rpm), ("tokens", args.tpm)):
            folder = Path(tmp) / kind
            folder.mkdir()
            measure(kind, limit, args.minutes, folder)


if __name__ == "__main__":
    main()
