"""PPO rollouts from the real vLLM engine: after a weight sync its log-probs are the policy's, and a
PPO run with `rollout: vllm` trains and reports the sync time."""

from __future__ import annotations

import torch
from synthetic import group_config, ppo_config, read_metrics

from cai.train import grpo, ppo
from cai.train.losses import token_logps
from cai.train.vllm_rollout import VLLMRollout


def policy_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 :]
    return token_logps(logits, ids[:, len(prompt) - 1 :])[0]


def test_engine_log_probs_match_the_policy_after_a_sync(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the checkpoint the engine loaded
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"question {i}"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for i in range(4)
    ]
    engine = VLLMRollout(str(tiny_model), {"kv_cache_memory_bytes": 256 << 20}, max_model_len=256)
    try:

        def worst_gap() -> float:
            answers, scores = engine.generate(prompts, seed=1, temperature=1.0, top_p=1.0, max_tokens=8, logprobs=True)
            return max(
                (policy_logps(policy, p, a) - torch.tensor(s)).abs().max().item()
                for p, a, s in zip(prompts, answers, scores)
            )

        before = worst_gap()
        seconds = engine.sync(policy)
        after = worst_gap()
    finally:
        engine.close()
    assert before > 0.05 and after < 2e-3, (before, after)
    assert seconds > 0


def test_ppo_with_vllm_rollouts(tmp_path, tiny_model, target_tokens):
    cfg = ppo_config(
        tmp_path,
        tiny_model,
        target_tokens,
        "vllm",
        steps=2,
        rollout="vllm",
        vllm_options={"kv_cache_memory_bytes": 256 << 20},
    )
    final = ppo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert all(metrics[s]["seconds_weight_sync"] > 0 and 0 <= metrics[s]["reward"] <= 1 for s in (1, 2))
    assert metrics[2]["response_length"] > 0 and (final / "model.safetensors").exists()


def test_grpo_with_vllm_rollouts_raises_the_reward(tmp_path, tiny_model, target_tokens):
    """The engine samples each prompt's K answers from the policy's current weights (a sync per step)."""
    cfg = group_config(
        tmp_path,
        tiny_model,
        target_tokens,
        "grpo",
        "grpo-vllm",
        rollout="vllm",
        vllm_options={"kv_cache_memory_bytes": 256 << 20},
    )
    grpo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert all(metrics[s]["seconds_weight_sync"] > 0 for s in metrics)
    early, late = (metrics[1]["reward"] + metrics[2]["reward"]) / 2, (metrics[15]["reward"] + metrics[16]["reward"]) / 2
    assert late > early + 0.1, (early, late)
