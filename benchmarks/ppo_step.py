"""Where a PPO step's time goes (generation, scoring, training, weight sync), with rollouts from HF
generation and from the vLLM engine holding the policy's weights, on the embedded SmolLM2.

    .venv/bin/python benchmarks/ppo_step.py [--steps 3] [--batch-size 8] [--max-new-tokens 48]

The reward is a rule (the share of answer tokens among common English words), so no reward model has
to be trained first; a reward model's forward pass would add to `scoring` on both sides alike. The
first step of each side is a warm-up and is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("seconds_generation", "seconds_weight_sync", "seconds_scoring", "seconds_training")
WORDS = [
    " the",
    " a",
    " to",
    " and",
    " is",
    " you",
    " that",
    " it",
    " of",
    " not",
    " can",
    " help",
    " safe",
    " please",
    " I",
    " sorry",
]


def run(kind: str, folder: Path, args) -> dict[str, float]:
    from cai.train import config as train_config
    from cai.train import ppo

    doc = {
        "model": "smollm2",
        "data": {"train": str(ROOT / "prompts" / "red_team_demo.jsonl")},
        "output_dir": str(folder / kind),
        "max_steps": args.steps + 1,
        "batch_size": args.batch_size,
        "lr": 1.0e-6,
        "max_length": 384,
        "save_every": 1000,
        "seed": 1,
        "ppo": {
            "rewards": [{"name": "words", "rule": "token_fraction", "tokens": WORDS}],
            "rollout": kind,
            "max_new_tokens": args.max_new_tokens,
            "ppo_epochs": 2,
            "minibatch_size": args.batch_size // 2,
            "vllm_options": {"kv_cache_memory_bytes": 1 << 30},
        },
    }
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(doc))
    ppo.train(train_config.load("ppo", path))
    steps = [json.loads(line) for line in (folder / kind / "metrics.jsonl").read_text().splitlines()][1:]  # warm-up out
    medians = {phase: statistics.median(s[phase] for s in steps) for phase in PHASES}
    medians["step"] = sum(medians.values())
    medians["generation_tokens_per_s"] = statistics.median(s["generation_tokens_per_s"] for s in steps)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side, after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: run(kind, Path(tmp), args) for kind in ("hf", "vllm")}
    print(
        f"PPO step on SmolLM2-135M, {args.batch_size} prompts x {args.max_new_tokens} new tokens, median of {args.steps} steps (s):"
    )
    print(f"  {'phase':<22}{'hf':>10}{'vllm':>10}")
    for phase in (*PHASES, "step"):
        print(f"  {phase.removeprefix('seconds_'):<22}{results['hf'][phase]:>10.2f}{results['vllm'][phase]:>10.2f}")
    print(
        f"  generation tokens/s   {results['hf']['generation_tokens_per_s']:>10.1f}{results['vllm']['generation_tokens_per_s']:>10.1f}"
    )
    print(
        f"generation hf/vllm time ratio: {results['hf']['seconds_generation'] / results['vllm']['seconds_generation']:.2f}x"
    )
    print(
        f"whole step hf/vllm time ratio: {results['hf']['step'] / results['vllm']['step']:.2f}x (weight sync {results['vllm']['seconds_weight_sync']:.2f} s a step)"
    )


if __name__ == "__main__":
    main()
