"""`cai train grpo` and `cai train rloo`: K sampled answers per prompt, each answer's advantage taken
relative to the other answers of its prompt, no value model.

- GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean) / std over the prompt's K rewards (or
  only centred: `scale_rewards: false`, Dr. GRPO); the KL to the reference is GRPO's per-token k3
  estimator, weighted by `kl_beta`, in the loss; each answer's tokens are averaged, then the answers.
- RLOO (Ahmadian et al. 2024, "Back to Basics"): the reward is r_i - kl_beta KL(y_i) with the
  sequence KL sum_t log pi/pi_ref of the sampled tokens; A_i = that reward minus the mean of the
  prompt's other K - 1; REINFORCE on the whole answer (one action).

One module for both kinds: they differ only in those three places (advantage, where the KL goes,
how the loss sums tokens); rollout, reference, scoring, update, metrics and checkpoints are the same,
and the rollout and reference pieces are PPO's too (rollout.py).

Each step: `batch_size` prompts, each sampled K times (HF generation, or the vLLM engine holding the
policy's weights); rewards from the sources (reward models, rules, the judge); advantages; then
`epochs` passes of minibatches of whole groups (one pass of one minibatch by default: on-policy,
ratio 1, no need for the old log-probs' extra forward pass in GRPO). A prompt's K answers go through the
model as one packed row that holds the prompt once (rollout.group_logps_and_entropy): the prompt's
tokens are computed once, not K times, in the reference's pass and in the update's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.core.seeding import derive_seed
from cai.train import checkpoint, loop, runtime
from cai.train.config import TrainConfig
from cai.train.losses import group_advantages, grpo_loss, masked_mean, rloo_advantages, rloo_loss
from cai.train.reward import Rewards
from cai.train.rollout import Sampler, finish, group_logps_and_entropy, load_prompts, reference_logps, setup


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint."""
    from transformers import AutoModelForCausalLM

    kind = config.kind
    options = getattr(config, kind)
    acc, tokenizer = setup(config, f"set {kind}.minibatch_size instead")

    # --- prompts and rewards: validated before anything is written
    conversations, encoded = load_prompts(config, tokenizer, options.max_new_tokens, acc)
    rewards = Rewards.of(config, kind, tokenizer, acc.device)
    rewards.check_prompts(conversations)

    resume = runtime.prepare_output(config, acc)
    batches = runtime.batches(config, acc, [len(ids) for ids in encoded])
    steps = config.max_steps or config.epochs * batches.per_epoch
    k = options.samples
    answers = config.batch_size * k
    minibatch = options.minibatch_size or answers
    updates = options.epochs * math.ceil(answers / minibatch)
    # on-policy (one update per rollout) needs no separate pass for the sampling policy's log-probs in
    # GRPO: they are the update's own, detached; RLOO needs them first, for the KL in its reward
    needs_old = updates > 1 or (kind == "rloo" and options.kl_beta > 0)

    # --- models: policy (trained), reference (frozen; not loaded when beta is 0)
    policy, optimizer, scheduler = runtime.trainable(
        config, acc, resume, steps * updates, AutoModelForCausalLM, "CAUSAL_LM"
    )
    reference = runtime.load_reference(config, acc) if options.kl_beta > 0 else None
    sampler = Sampler(config, options, tokenizer, acc, f"{kind}-rollout")

    state, metrics = loop.begin(config, acc, resume, steps)
    position = state["position"]

    for step in range(state["step"] + 1, steps + 1):
        indexes = batches(position)
        position += 1
        # a prompt's K answers are adjacent
        rollout = sampler(policy, [encoded[i] for i in indexes for _ in range(k)], step)
        prompts = [conversations[i] for i in indexes for _ in range(k)]
        scored = score(config, rollout, prompts, sampler, rewards, policy, reference, acc, needs_old)
        started = time.perf_counter()
        logs, sampled_logp = update(config, acc, policy, optimizer, scheduler, rollout, scored, step, minibatch)
        training_seconds = time.perf_counter() - started
        values = figures(config, rollout, scored, logs, sampled_logp, training_seconds)
        metrics.log(step, "train", {**values, "lr": scheduler.get_last_lr()[0]})
        if step % config.save_every == 0 or step == steps:
            checkpoint.save(
                acc, policy, tokenizer, config.output_dir, step, {"position": position}, config.keep_checkpoints
            )
        if step == stop_after:
            break
    return finish(config, acc, policy, tokenizer, steps, stop_after, opened=(metrics, sampler, rewards))


@dataclass
class Scored:
    """A rollout scored, and what its update compares against: the sampling policy's log-probs (None
    when the update's own, detached, serve), the reference's (None when kl_beta is 0), the rewards and
    the advantages."""

    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    score: torch.Tensor  # the combined reward of each answer
    each: dict[str, torch.Tensor]  # each reward source's
    advantages: torch.Tensor
    reference_seconds: float
    scoring_seconds: float
    judge_wait: float


def score(
    config: TrainConfig, rollout, prompts, sampler, rewards: Rewards, policy, reference, acc, needs_old
) -> Scored:
    """The rollout's rewards (the judge's calls in flight while the log-probs are computed) and its
    group-relative advantages: GRPO's whitened (or centred) rewards, RLOO's leave-one-out baseline of
    the KL-shaped reward."""
    options = getattr(config, config.kind)
    k, mask = options.samples, rollout.mask
    started = time.perf_counter()
    pending = rewards.start(prompts, sampler.texts(rollout), rollout.responses, mask)
    with torch.no_grad():
        everyone = torch.arange(len(rollout.ids))
        old_logp = group_logps_and_entropy(policy, rollout, everyone, k, options.temperature)[0] if needs_old else None
        ref_logp = (
            reference_logps(reference, policy, acc, rollout, options.temperature, k) if options.kl_beta > 0 else None
        )
    reference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    total, each, judge_wait = pending.result()
    total = total.to(acc.device)
    scoring_seconds = time.perf_counter() - started
    if config.kind == "grpo":
        advantages = group_advantages(total.view(-1, k), options.scale_rewards).flatten()
    else:
        shaped = total - options.kl_beta * ((old_logp - ref_logp) * mask).sum(1) if options.kl_beta > 0 else total
        advantages = rloo_advantages(shaped.view(-1, k)).flatten()
    return Scored(old_logp, ref_logp, total, each, advantages, reference_seconds, scoring_seconds, judge_wait)


def update(
    config: TrainConfig, acc, policy, optimizer, scheduler, rollout, scored: Scored, step: int, minibatch: int
) -> tuple[list[dict[str, float]], torch.Tensor]:
    """`epochs` passes of shuffled minibatches of whole groups (a prompt's answers stay together): the
    figures of each update, and the sampling policy's log-probs (the first pass's own where none
    were computed before it)."""
    kind, options = config.kind, getattr(config, config.kind)
    k, mask, ref_logp, old_logp = options.samples, rollout.mask, scored.ref_logp, scored.old_logp
    order = torch.Generator().manual_seed(derive_seed(config.seed, f"{kind}-minibatches", step))
    sampled_logp = old_logp if old_logp is not None else torch.empty_like(mask)
    logs = []
    for _ in range(options.epochs):
        for groups in torch.randperm(len(rollout.ids) // k, generator=order).split(minibatch // k):
            chunk = (groups[:, None] * k + torch.arange(k)).flatten()
            logp, entropy = group_logps_and_entropy(policy, rollout, chunk, k, options.temperature)
            old = old_logp[chunk] if old_logp is not None else logp.detach()
            if old_logp is None:
                sampled_logp[chunk] = logp.detach()
            if kind == "grpo":
                ref = ref_logp[chunk] if ref_logp is not None else None
                loss, k3, clip_fraction = grpo_loss(
                    logp, old, ref, scored.advantages[chunk], options.clip_range, options.kl_beta, mask[chunk]
                )
            else:
                loss, clip_fraction = rloo_loss(logp, old, scored.advantages[chunk], options.clip_range, mask[chunk])
            runtime.check_finite(loss, "loss", step, config.output_dir)
            acc.backward(loss)
            grad_norm = runtime.apply_gradients(config, acc, policy.parameters(), optimizer, scheduler, step)
            log = {
                "loss": loss.item(),
                "clip_fraction": clip_fraction.item(),
                "entropy": masked_mean(entropy, mask[chunk]).item(),
                "grad_norm": grad_norm.item(),
            }
            if kind == "grpo" and ref_logp is not None:
                log["kl_k3"] = k3.item()
            logs.append(log)
    return logs, sampled_logp


def figures(
    config: TrainConfig,
    rollout,
    scored: Scored,
    logs: list[dict[str, float]],
    sampled_logp: torch.Tensor,
    training_seconds: float,
) -> dict[str, float]:
    """A step's line in metrics.jsonl: rewards and their spread within groups, KL, the updates' mean
    figures, lengths and where the time went."""
    options = getattr(config, config.kind)
    mask, answers = rollout.mask, len(rollout.ids)
    answer_tokens = mask.sum().item()
    grouped = scored.score.view(-1, options.samples)
    values = {
        "reward": scored.score.mean().item(),
        **{f"reward_{name}": v.mean().item() for name, v in scored.each.items()},
        "reward_std_in_group": grouped.std(dim=1).mean().item(),
        "groups_without_signal": (grouped.std(dim=1) == 0).float().mean().item(),  # equal rewards: advantage 0
        **{key: sum(log[key] for log in logs) / len(logs) for key in logs[0]},
        "response_length": answer_tokens / answers,
        "generation_tokens_per_s": answer_tokens / rollout.generation_seconds,
        "training_tokens_per_s": options.epochs * rollout.attention.sum().item() / training_seconds,
        "seconds_generation": rollout.generation_seconds,
        "seconds_scoring": scored.scoring_seconds,
        "seconds_reference": scored.reference_seconds,
        "seconds_training": training_seconds,
        "seconds_weight_sync": rollout.sync_seconds,
        "seconds_judge_wait": scored.judge_wait,
    }
    if scored.ref_logp is not None:
        token_kl = (sampled_logp - scored.ref_logp) * mask
        values["kl"] = token_kl.sum(1).mean().item()
        values["kl_per_token"] = (token_kl.sum() / answer_tokens).item()
    return values
