"""PPO, A2C, GRPO and RLOO side by side on the tests' synthetic task and the same budget, and the share
of a GRPO step spent waiting for a judge on the API path.

    .venv/bin/python benchmarks/online_rl_synthetic.py [--steps 16] [--judge-steps 4]

The task: the tiny random Llama the tests build (tests/tiny_model.py) answers the red-team demo prompts
with 3 tokens; the reward is the share of answer tokens among a fixed ~30% of the vocabulary (the rule
reward the trainer tests use). Every method sees 48 answers a step (PPO and A2C: 48 prompts; GRPO and
RLOO: 12 prompts x 4 answers), lr 5e-3, KL coefficient 0.01, `--steps` steps, seed 1, one thread.
Printed per method: the mean reward of the first two and the last two steps, the KL per token at the
end (log pi - log pi_ref of the sampled tokens), and the median seconds per step.

The judge part: GRPO with the `judge` reward source in score mode through the real vLLM OpenAI server
on 127.0.0.1 (the judge model of tests/train/test_judge.py), `--judge-steps` steps; printed: the
seconds per step spent waiting for the judge after the policy's own work, and their share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "train")]


def tokens_of(tiny: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    texts = [tokenizer.decode([i]) for i in range(300, 600)]
    return [t for t in texts if len(tokenizer.encode(t, add_special_tokens=False)) == 1]


def summary(output_dir: Path, steps: int, seconds: list[float]) -> dict:
    from synthetic import read_metrics

    m = read_metrics(output_dir)
    return {
        "reward_first2": (m[1]["reward"] + m[2]["reward"]) / 2,
        "reward_last2": (m[steps - 1]["reward"] + m[steps]["reward"]) / 2,
        "kl_per_token_last": m[steps]["kl_per_token"],
        "median_s_per_step": statistics.median(seconds),
    }


def step_seconds(run) -> list[float]:
    """Seconds between consecutive metrics lines (ends of steps), the first step's from the run's start."""
    from cai.train.metrics import MetricsLog

    stamps, log = [], MetricsLog.log

    def timed(self, step, split, values):
        log(self, step, split, values)
        stamps.append(time.perf_counter())

    MetricsLog.log = timed
    started = time.perf_counter()
    try:
        run()
    finally:
        MetricsLog.log = log
    return [b - a for a, b in zip([started, *stamps], stamps)][1:]  # the first step holds the model loading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--judge-steps", type=int, default=4, help="0: skip the judge part")
    args = parser.parse_args()

    import torch
    from conftest import corpus
    from synthetic import group_config, judge_model, ppo_config, read_metrics, write_config
    from tiny_model import build_tiny_model

    from cai.train import grpo, ppo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_model(tmp / "tiny", corpus())
        tokens = tokens_of(tiny)
        runs = {
            "ppo": (ppo.train, ppo_config(tmp, tiny, tokens, "ppo", steps=args.steps)),
            "a2c": (
                ppo.train,
                ppo_config(tmp, tiny, tokens, "a2c", steps=args.steps, algorithm="a2c", ppo_epochs=None),
            ),
            "grpo": (grpo.train, group_config(tmp, tiny, tokens, "grpo", "grpo", steps=args.steps)),
            "rloo": (grpo.train, group_config(tmp, tiny, tokens, "rloo", "rloo", steps=args.steps)),
        }
        results = {}
        for name, (train, cfg) in runs.items():
            from dataclasses import replace

            cfg = replace(cfg, lr=5e-3)  # one learning rate for all
            seconds = step_seconds(lambda: train(cfg))
            results[name] = summary(cfg.output_dir, args.steps, seconds)
            r = results[name]
            print(
                f"{name:<5} reward {r['reward_first2']:.3f} -> {r['reward_last2']:.3f}   KL/token at the end {r['kl_per_token_last']:.3f}   "
                f"{r['median_s_per_step']:.2f} s/step",
                flush=True,
            )

        if args.judge_steps:
            import os

            from api_server import API_KEY, SERVED_NAME, VLLMServer

            os.environ["CAI_BENCH_KEY"] = API_KEY
            server = VLLMServer(judge_model(tiny, tmp / "judge"), tmp / "server.log")
            try:
                server.wait_healthy()
                backend = {
                    "type": "openai",
                    "model": SERVED_NAME,
                    "base_url": server.url,
                    "api_key_env": "CAI_BENCH_KEY",
                }
                source = {
                    "name": "judge",
                    "judge": {"backend": backend, "constitution": str(ROOT / "constitutions" / "harmless.yaml")},
                }
                path = write_config(
                    tmp / "judge.yaml",
                    model=str(tiny),
                    data={"train": str(ROOT / "prompts" / "red_team_demo.jsonl")},
                    output_dir=str(tmp / "judged"),
                    max_steps=args.judge_steps,
                    batch_size=12,
                    lr=5e-3,
                    max_length=192,
                    save_every=10**6,
                    seed=1,
                    grpo={"rewards": [source], "samples": 4, "max_new_tokens": 3, "kl_beta": 0.01},
                )
                from cai.train import config as train_config

                cfg = train_config.load("grpo", path)
                seconds = step_seconds(lambda: grpo.train(cfg))
            finally:
                server.stop()
            m = read_metrics(cfg.output_dir)
            waits = [m[s]["seconds_judge_wait"] for s in range(2, args.judge_steps + 1)]
            share = sum(waits) / sum(seconds)
            results["grpo_judge"] = {
                "median_s_per_step": statistics.median(seconds),
                "median_judge_wait_s": statistics.median(waits),
                "judge_wait_share": share,
                "judge_calls_per_step": 12 * 4,
            }
            print(
                f"grpo + API judge: {statistics.median(seconds):.2f} s/step, waiting for the judge {statistics.median(waits):.2f} s/step "
                f"({share:.0%} of the step; 48 judge calls a step)"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
