"""SFT throughput with packed (padding-free) batches against padded ones on the HH-RLHF length
distribution: trained (assistant) tokens per second, same model, data, token budget and settings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py [--steps 4] [--warmup 1] [--rounds 2]
        [--batch-size 4] [--max-length 512] [--threads 1]

The model is the embedded SmolLM2-135M-Instruct, full fine-tune in fp32. The data are the HH-RLHF
harmless conversations (../shared/data/hh-rlhf/harmless-base-test.dev.jsonl: each prompt with its chosen
answer, every turn of it, as `messages`), cut to max_length as `cai train sft` cuts them. Three runs of
`cai train sft`, each in its own process, alternated over rounds:
- padded: batches of batch-size random examples, padded to the longest (sft.bucket_by_length: false);
- bucketed: cai's default, batches of similar lengths (less padding, the same examples per epoch);
- packed: `packing: true`, rows of at most batch-size x max-length tokens (the padded batch's budget)
  filled by best-fit decreasing.
A step's trained tokens are its `tokens` metric (assistant tokens, what the loss counts); tokens/s is
their sum over the timed steps over those steps' time (warm-up excluded). Ratios are against padded and
against bucketed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve()
LAYOUTS = ("padded", "bucketed", "packed")


def run_layout(args) -> None:
    """One run (in the process `main` started): prints its timed steps' tokens and seconds as JSON."""
    import torch

    from cai.train import sft
    from cai.train.metrics import MetricsLog

    torch.set_num_threads(args.threads)
    stamps, tokens = [], []
    log = MetricsLog.log

    def timed(self, step, split, values):
        log(self, step, split, values)
        if split == "train":
            stamps.append(time.perf_counter())
            tokens.append(values["tokens"])

    MetricsLog.log = timed
    with tempfile.TemporaryDirectory() as tmp:
        doc = _common.our_doc(
            "smollm2",
            args.data,
            Path(tmp) / "out",
            args.batch_size,
            args.max_length,
            max_steps=args.warmup + args.steps,
            sft={"bucket_by_length": args.layout == "bucketed"},
        )
        if args.layout == "packed":
            doc["packing"] = True
        sft.train(_common.our_config("sft", doc, Path(tmp)))
    timed_steps = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    print(json.dumps({"tokens": sum(tokens[args.warmup :]), "seconds": sum(timed_steps), "steps": len(timed_steps)}))


def write_conversations(path: Path) -> int:
    pairs = _common.hh_pairs()
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"messages": p.prompt + p.chosen}) + "\n")
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout is not None:
        run_layout(args)
        return
    if args.warmup < 1:
        sys.exit("--warmup must be at least 1: the first step's time includes loading")

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "hh.jsonl"
        n = write_conversations(data_file)
        print(
            f"SmolLM2 fp32 SFT on {n} HH-RLHF conversations (max_length {args.max_length}), batch_size "
            f"{args.batch_size} (packed: rows of {args.batch_size * args.max_length} tokens), {args.warmup} warm-up + "
            f"{args.steps} timed steps, {args.threads} thread(s)",
            flush=True,
        )
        for round_ in range(args.rounds):
            for layout in LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]:
                argv = [a for a in sys.argv[1:]] + ["--layout", layout, "--data", str(data_file)]
                done = subprocess.run(
                    [sys.executable, str(HERE), *argv], capture_output=True, text=True, cwd=_common.ROOT, env=env
                )
                if done.returncode != 0:
                    sys.exit(f"{layout} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[layout].append(result)
                print(
                    f"round {round_ + 1} {layout:<8} {result['tokens'] / result['seconds']:.0f} trained tokens/s "
                    f"({result['tokens']:.0f} tokens in {result['seconds']:.1f} s, {result['steps']} steps)",
                    flush=True,
                )
    rate = {k: sum(r["tokens"] for r in v) / sum(r["seconds"] for r in v) for k, v in results.items()}
    ratios = {
        "packed_vs_padded": rate["packed"] / rate["padded"],
        "packed_vs_bucketed": rate["packed"] / rate["bucketed"],
    }
    print(
        f"trained tokens/s: padded {rate['padded']:.0f}, bucketed {rate['bucketed']:.0f}, packed {rate['packed']:.0f}"
        f"  ->  packed/padded {ratios['packed_vs_padded']:.2f}, packed/bucketed {ratios['packed_vs_bucketed']:.2f}"
    )
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
