"""GRPO and RLOO on the tiny model with the rule reward: each raises it, a large beta holds the policy
at the reference, and a stopped run resumes with the numbers of an uninterrupted one."""

from __future__ import annotations

import pytest
from synthetic import group_config, read_metrics

from cai.train import grpo


def early_late(metrics: dict[int, dict], key: str, steps: int) -> tuple[float, float]:
    return (metrics[1][key] + metrics[2][key]) / 2, (metrics[steps - 1][key] + metrics[steps][key]) / 2


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_methods_raise_the_reward(tmp_path, tiny_model, target_tokens, kind):
    cfg = group_config(tmp_path, tiny_model, target_tokens, kind, kind)
    final = grpo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    early, late = early_late(metrics, "reward", 16)
    assert late > early + 0.1, (early, late)
    assert 0 < metrics[16]["kl_per_token"] < 1.0  # moved from the reference, not collapsed
    assert {"reward_share", "reward_std_in_group", "entropy", "clip_fraction", "seconds_generation", "seconds_reference"} <= set(metrics[16])
    assert (final / "model.safetensors").exists() and (cfg.output_dir / "curves.png").exists()


def test_a_large_beta_holds_grpo_at_the_reference(tmp_path, tiny_model, target_tokens):
    free = group_config(tmp_path, tiny_model, target_tokens, "grpo", "free", steps=10)
    held = group_config(tmp_path, tiny_model, target_tokens, "grpo", "held", steps=10, kl_beta=20.0)
    grpo.train(free)
    grpo.train(held)
    a, b = read_metrics(free.output_dir), read_metrics(held.output_dir)

    def late(metrics, key):
        return sum(metrics[s][key] for s in range(7, 11)) / 4

    assert late(b, "kl_per_token") < late(a, "kl_per_token") / 2, (late(a, "kl_per_token"), late(b, "kl_per_token"))
    assert late(b, "reward") < late(a, "reward")


@pytest.mark.parametrize("kind, options", [("grpo", {"epochs": 2, "minibatch_size": 24}), ("rloo", {})])
def test_stopped_run_resumes_exactly(tmp_path, tiny_model, target_tokens, kind, options):
    whole = group_config(tmp_path, tiny_model, target_tokens, kind, "whole", steps=4, **options)
    grpo.train(whole)
    parts = group_config(tmp_path, tiny_model, target_tokens, kind, "parts", steps=4, **options)
    grpo.train(parts, stop_after=2)
    assert not (parts.output_dir / "final").exists()
    grpo.train(parts)
    a, b = read_metrics(whole.output_dir), read_metrics(parts.output_dir)
    for step in (3, 4):
        for key in ("reward", "loss", "kl", "clip_fraction"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
