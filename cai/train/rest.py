"""`cai train rest`: ReST, Reinforced Self-Training (Gulcehre et al. 2023).

Grow: sample K answers per prompt from the current policy (the vLLM engine) and score each once with the
reward models and rules. Improve: for each threshold of a rising schedule, fine-tune the current policy
on the Grow samples whose reward is at or above it, without sampling again; each Improve step starts
from the previous one's model, on a subset of its data. The next Grow samples from the last Improve
step's model. `rest.threshold_type: quantile` reads the thresholds as quantiles of each Grow's rewards
(a reward model's scale is arbitrary); `reward` takes them as rewards.

OUTPUT/
  grow-G/samples.jsonl          every sample in `messages` form, with its reward (and samples/, a HF datasets folder)
  grow-G/improve-I/data.jsonl   the samples at or above threshold I (and data/)
  grow-G/improve-I/sft/         that Improve step's fine-tuning (checkpoints, metrics, final/)
  rest.jsonl                    per Grow (samples, mean reward) and per threshold (its value, samples kept, their mean reward)
  final/                        the last Improve step's model

A rerun reuses every written Grow and Improve data set and resumes the fine-tuning where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cai.core.disk import read_jsonl, write_atomic
from cai.train.config import TrainConfig
from cai.train.rejection import begin, fine_tune, publish_final, sample_scored, sft_record, write_sft_records


def train(config: TrainConfig) -> Path:
    options = config.rest
    prompts, rewards, model = begin(config, "rest")
    log: list[dict] = []
    for grow in range(1, options.grow_steps + 1):
        folder = config.output_dir / f"grow-{grow}"

        # --- Grow: K samples per prompt from the current policy, scored once
        samples_file = folder / "samples.jsonl"
        if not samples_file.exists():
            sampled = sample_scored(config, options, prompts, model, rewards, "rest", grow)
            records = [
                {**sft_record(s, k), "reward": reward, "sample": k, "grow": grow, "model": str(model)}
                for s in sampled
                for k, reward in enumerate(s.rewards)
            ]
            write_sft_records(samples_file, records)
        samples = list(read_jsonl(samples_file))
        grow_rewards = torch.tensor([r["reward"] for r in samples])
        log.append(
            {
                "grow": grow,
                "model": str(model),
                "prompts": len({r["id"] for r in samples}),
                "samples": len(samples),
                "mean_reward": grow_rewards.mean().item(),
            }
        )

        # --- Improve: one fine-tuning per threshold, each on the samples at or above it
        for improve, threshold in enumerate(options.thresholds, start=1):
            value = threshold if options.threshold_type == "reward" else grow_rewards.quantile(threshold).item()
            kept = [r for r in samples if r["reward"] >= value]
            log.append(
                {
                    "grow": grow,
                    "improve": improve,
                    "threshold": threshold,
                    "threshold_value": value,
                    "kept": len(kept),
                    "kept_fraction": len(kept) / len(samples),
                    "mean_kept_reward": sum(r["reward"] for r in kept) / len(kept) if kept else None,
                }
            )
            write_atomic(config.output_dir / "rest.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            if not kept:
                break  # the thresholds rise: no later one keeps a sample either
            data_file = folder / f"improve-{improve}" / "data.jsonl"
            if not data_file.exists():
                write_sft_records(data_file, kept)
            model = fine_tune(config, model, data_file, data_file.parent / "sft")
    return publish_final(model, config.output_dir)
