"""Does `cai run` scale with the dataset? SL-CAI over the canned API server (5 ms answers) on N and 10N
prompts: peak resident memory of the whole `cai run` process at both sizes (their ratio), seconds per
row at both sizes, and the time to rerun the finished large run (it skips every row and re-exports)
against its first run.

    .venv/bin/python benchmarks/engine_scale.py [--small 10000] [--large 100000] [--concurrency 64]

Targets: peak RSS(large) / RSS(small) <= 1.5; seconds per row within 20%; rerun <= 10% of the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from api_pipeline import write_pipeline, write_prompts  # noqa: E402
from canned_server import CannedServer  # noqa: E402


def timed_run(pipeline: Path, run_dir: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `cai run`, the process's own high-water mark."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai.cli", "run", str(pipeline), "--run-dir", str(run_dir), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"cai run failed: {proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--median-s", type=float, default=0.005)
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp, CannedServer("--median-s", str(args.median_s), "--sigma", "0") as server:
        for n in (args.small, args.large):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            pipeline = write_pipeline(folder, write_prompts(folder, n), server.url, args.concurrency, 16)
            seconds, rss = timed_run(pipeline, folder / "run")
            figures[n] = (seconds, rss)
            print(
                f"{n} prompts: {seconds:.1f} s ({1000 * seconds / n:.2f} ms a row, {3 * n / seconds:.0f} requests/s), peak RSS {rss:.0f} MiB",
                flush=True,
            )
        rerun, rerun_rss = timed_run(pipeline, folder / "run")
    (s_small, m_small), (s_large, m_large) = figures[args.small], figures[args.large]
    print(f"rerun of the finished {args.large}-row run: {rerun:.1f} s, peak RSS {rerun_rss:.0f} MiB")
    print(f"peak RSS ratio {args.large}/{args.small}: {m_large / m_small:.2f}  (target <= 1.5)")
    print(
        f"seconds per row ratio {args.large}/{args.small}: {(s_large / args.large) / (s_small / args.small):.2f}  (target 0.8-1.2)"
    )
    print(f"rerun / run of the {args.large}-row run: {rerun / s_large:.3f}  (target <= 0.10)")


if __name__ == "__main__":
    main()
