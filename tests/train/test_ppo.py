"""PPO on the tiny model with a rule reward (the share of answer tokens from a fixed set): it learns,
a large KL coefficient holds it at the reference, and a stopped run resumes exactly."""

from __future__ import annotations

import pytest
import torch
from synthetic import ppo_config, read_metrics

from cai.core.errors import InputError
from cai.train import ppo, rollout


def early_late(metrics: dict[int, dict], key: str, steps: int) -> tuple[float, float]:
    return (metrics[1][key] + metrics[2][key]) / 2, (metrics[steps - 1][key] + metrics[steps][key]) / 2


def test_ppo_raises_the_reward_and_a_large_beta_holds_the_policy(tmp_path, tiny_model, target_tokens):
    free = ppo_config(tmp_path, tiny_model, target_tokens, "free")
    final = ppo.train(free)
    metrics = read_metrics(free.output_dir)
    early, late = early_late(metrics, "reward", 16)
    assert late > early + 0.1, (early, late)
    assert metrics[16]["kl_per_token"] < 1.0  # learnt, not collapsed
    assert {
        "clip_fraction",
        "value_loss",
        "entropy",
        "response_length",
        "generation_tokens_per_s",
        "training_tokens_per_s",
        "seconds_generation",
    } <= set(metrics[16])
    assert (final / "model.safetensors").exists() and (free.output_dir / "curves.png").exists()
    assert (free.output_dir / "checkpoints" / "step-16" / "value" / "model.safetensors").exists()

    held = ppo_config(tmp_path, tiny_model, target_tokens, "held", beta=2.0)
    ppo.train(held)
    held_metrics = read_metrics(held.output_dir)
    assert all(abs(held_metrics[s]["kl_per_token"]) < 0.15 for s in (15, 16))
    assert held_metrics[16]["kl_per_token"] < metrics[16]["kl_per_token"] / 2
    assert early_late(held_metrics, "reward", 16)[1] < late


def test_adaptive_kl_moves_beta_towards_the_target(tmp_path, tiny_model, target_tokens):
    cfg = ppo_config(tmp_path, tiny_model, target_tokens, "adaptive", beta=0.5, steps=4, kl_target=1.0, kl_horizon=100)
    ppo.train(cfg)
    betas = [m["kl_beta"] for _, m in sorted(read_metrics(cfg.output_dir).items())]
    assert betas[0] == 0.5 and all(b < a for a, b in zip(betas, betas[1:]))  # KL far below target: beta falls


def test_stopped_run_resumes_exactly(tmp_path, tiny_model, target_tokens):
    whole = ppo_config(tmp_path, tiny_model, target_tokens, "whole", steps=4, kl_target=0.5)
    ppo.train(whole)
    parts = ppo_config(tmp_path, tiny_model, target_tokens, "parts", steps=4, kl_target=0.5)
    ppo.train(parts, stop_after=2)
    assert not (parts.output_dir / "final").exists()
    ppo.train(parts)
    a, b = read_metrics(whole.output_dir), read_metrics(parts.output_dir)
    for step in (3, 4):
        for key in ("reward", "policy_loss", "value_loss", "kl", "kl_beta"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_running_moments_match_the_whole_history():
    moments = ppo.RunningMoments()
    chunks = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5]), torch.tensor([3.0, -1.0])]
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks)
    assert moments.mean == pytest.approx(everything.mean().item()) and moments.var == pytest.approx(
        everything.var(unbiased=False).item()
    )
    assert moments.count == 6 and ppo.RunningMoments(moments.state()).mean == moments.mean


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 7, 2, 2, 9], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    assert rollout.response_mask(responses, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_a_rule_token_that_is_not_one_token_is_an_error(tmp_path, tiny_model):
    cfg = ppo_config(tmp_path, tiny_model, ["certainly not one token"], "bad")
    with pytest.raises(InputError, match=r"ppo\.rewards\[0\]\.tokens: 'certainly not one token' is \d+ tokens"):
        ppo.train(cfg)
    assert not (tmp_path / "bad").exists()


def test_a2c_raises_the_reward_with_one_unclipped_update_per_batch(tmp_path, tiny_model, target_tokens):
    cfg = ppo_config(tmp_path, tiny_model, target_tokens, "a2c", algorithm="a2c", ppo_epochs=None)
    ppo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    early, late = early_late(metrics, "reward", 16)
    assert late > early + 0.1, (early, late)
    assert "clip_fraction" not in metrics[16] and {"policy_loss", "value_loss", "approx_kl"} <= set(metrics[16])


def test_a2c_refuses_ppo_only_options(tmp_path, tiny_model, target_tokens):
    with pytest.raises(InputError, match=r"ppo\.ppo_epochs: an option of algorithm ppo"):
        ppo_config(tmp_path, tiny_model, target_tokens, "a2c-bad", algorithm="a2c")
