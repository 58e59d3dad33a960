"""GRPO and RLOO on the tiny model with the rule reward: each raises it, a large beta holds the policy
at the reference, a stopped run resumes with the numbers of an uninterrupted one, and under bf16 the
reference is held in bf16."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from synthetic import group_config, one_process, read_metrics

from cai.train import grpo, runtime


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
    assert {
        "reward_share",
        "reward_std_in_group",
        "entropy",
        "clip_fraction",
        "seconds_generation",
        "seconds_reference",
    } <= set(metrics[16])
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


def test_packed_groups_give_the_unpacked_log_probs(tiny_model):
    """K answers per prompt, prompts of different lengths, answers cut at different lengths by EOS:
    each group as one packed row (the prompt once) gives every answer token's log-prob and entropy as
    the answer alone does, and 0 past each answer's end."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.train.rollout import Sampler, group_logps_and_entropy, logps_and_entropy, response_mask

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    options = SimpleNamespace(temperature=0.7, top_p=1.0, max_new_tokens=12, rollout="hf")
    sampler = Sampler(SimpleNamespace(seed=3), options, tokenizer, one_process(), "test")
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in ("Hi?", "How do I bake bread at home with no oven at all?", "Why?")
    ]
    rollout = sampler(model, [p for p in prompts for _ in range(3)], step=1)
    ending = rollout.responses.flatten().mode().values.item()  # the commonest answer token as EOS: answers end early
    rollout.mask = response_mask(rollout.responses, ending)
    rollout.attention = torch.cat([rollout.attention[:, : rollout.start], rollout.mask.long()], dim=1)
    assert len(set(rollout.mask.sum(1).tolist())) > 1  # answers of several lengths
    with torch.no_grad():
        expected, expected_entropy = logps_and_entropy(model, rollout.ids, rollout.attention, rollout.start, 0.7)
        members = torch.tensor([3, 4, 5, 0, 1, 2, 6, 7, 8])  # groups in any order
        packed, entropy = group_logps_and_entropy(model, rollout, members, 3, 0.7)
    mask = rollout.mask[members]
    assert torch.allclose(packed, expected[members] * mask, atol=1e-5), (packed - expected[members] * mask).abs().max()
    assert torch.allclose(entropy, expected_entropy[members] * mask, atol=1e-4)


def test_under_bf16_the_reference_is_held_in_bf16_and_agrees_with_the_policy(
    tmp_path, tiny_model, target_tokens, monkeypatch, fresh_accelerate_state
):
    """bf16 mixed precision (a GPU's default) on the CPU: the frozen reference loads in bf16, half the
    memory of fp32 weights, and before any update its log-probs match the policy's autocast ones up to
    bf16 rounding (the first step's KL is near 0)."""
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_reference(*args, **kwargs))
        return loaded[-1]

    load_reference = runtime.load_reference
    monkeypatch.setattr(runtime, "load_reference", spy)
    config = group_config(tmp_path, tiny_model, target_tokens, "grpo", "bf16", steps=2)
    grpo.train(replace(config, precision="bf16", batch_size=4))

    [reference] = loaded
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    first = read_metrics(config.output_dir)[1]
    assert abs(first["kl_per_token"]) < 1e-3, first["kl_per_token"]
