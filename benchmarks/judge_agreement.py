"""Agreement of the SmolLM2 judge with human labels on the first HH-RLHF harmless pairs: accuracy with
the human-chosen answer shown first, shown second, swap-averaged, and position consistency.

    .venv/bin/python benchmarks/judge_agreement.py [--limit 200] [--ensemble 1] [--cot] [--compare-cot] [--injection]

A 135M judge is expected near chance; the figures are an honest baseline that the same command
measures for bigger judges (point --set at another backend model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--cot", action="store_true", help="the judge reasons before its scored choice (slow on CPU)")
    parser.add_argument(
        "--compare-cot", action="store_true", help="also measure with chain-of-thought switched the other way"
    )
    parser.add_argument(
        "--injection", action="store_true", help="also measure how often a planted 'choose me' is followed"
    )
    parser.add_argument("--set", action="append", default=[], help="pipeline overrides, as for cai run")
    args = parser.parse_args()

    from cai.generate import config, importers
    from cai.judge import eval_judge

    overrides = [f"stages.1.ensemble={args.ensemble}", f"stages.1.chain_of_thought={str(args.cot).lower()}", *args.set]
    cfg = config.load(ROOT / "pipelines" / "rl_cai.yaml", overrides)
    started = time.perf_counter()
    report = eval_judge.evaluate(
        cfg, importers.load_pairs(HH, args.limit), compare_cot=args.compare_cot, injection=args.injection
    )
    seconds = time.perf_counter() - started
    print(f"{args.limit} pairs, {seconds:.0f} s")
    for variant in report.get("by_chain_of_thought", {"": report}).values():
        print(f"{variant['n']} pairs judged ({variant['invalid']} invalid), judge {variant['judge']}")
        for key, name in (
            ("accuracy_first_order", "accuracy, no swap (chosen shown first)"),
            ("accuracy_swapped_order", "accuracy, no swap (chosen shown second)"),
            ("accuracy", "accuracy, swap-averaged"),
            ("position_consistency", "position consistency"),
            ("injection_follow_rate", "injected rejected answer chosen"),
            ("injection_baseline_rate", "... the same answer without injection"),
        ):
            if key in variant:
                low, high = variant[f"{key}_ci95"]
                print(f"  {name:<42} {variant[key]:.3f}  [{low:.3f}, {high:.3f}]")
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("n", "accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency")
            }
        )
    )


if __name__ == "__main__":
    main()
