"""`cai train ppo`: PPO against reward models (and rules), with a per-token KL penalty to a frozen
reference, as InstructGPT and the Constitutional AI paper run their RL stage.

Each step: a batch of prompts, one sampled answer each (HF generation, or the vLLM engine holding
the policy's current weights); one reward per answer from the reward models and rules, combined by
weight (optionally gated, Llama 2), normalised; the per-token reward is -beta (log pi - log pi_ref)
with the answer's reward added on its last token; GAE over the value model's estimates; then
`ppo_epochs` passes of minibatches of the clipped surrogate plus the clipped value loss (minus an
optional entropy bonus). beta is fixed, or adapted to a target KL (Ziegler et al. 2019).

`algorithm: a2c` runs the same loop as advantage actor-critic (Mnih et al. 2016): one update per
batch over the whole batch (no epochs, no minibatches), the plain policy gradient -A log pi (no ratio,
no clipping) and an unclipped value loss; rollout, rewards, KL penalty, GAE and advantage whitening
are PPO's, so the two compare on the same run.

The value model is a scalar head on its own transformer (a sequence-classification model read at
every token), started from the first reward model or the policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.core.seeding import derive_seed
from cai.train import checkpoint, data, loop, runtime
from cai.train.config import TrainConfig
from cai.train.losses import (
    AdaptiveKLController,
    FixedKLController,
    a2c_loss,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from cai.train.reward import Rewards
from cai.train.rollout import Sampler, finish, load_prompts, logps_and_entropy, positions, reference_logps, setup


class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update): rewards are
    normalised by them, so their scale does not drift with the policy."""

    def __init__(self, state: dict | None = None):
        self.mean, self.var, self.count = (state["mean"], state["var"], state["count"]) if state else (0.0, 1.0, 0)

    def update(self, values: torch.Tensor) -> None:
        n, mean, var = values.numel(), values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


def normalise(scores: torch.Tensor, how: str, moments: RunningMoments) -> torch.Tensor:
    if how == "none":
        return scores
    if how == "batch":
        return (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    moments.update(scores)
    return (scores - moments.mean) / (math.sqrt(moments.var) + 1e-8)


class TokenValues(torch.nn.Module):
    """A sequence-classification model's scalar head read at every token: V(s_t) per position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
        ).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    options = config.ppo
    acc, tokenizer = setup(config, "set ppo.minibatch_size instead")

    # --- prompts and rewards: validated before anything is written
    conversations, encoded = load_prompts(config, tokenizer, options.max_new_tokens, acc)
    rewards = Rewards.of(config, "ppo", tokenizer, acc.device)
    rewards.check_prompts(conversations)

    resume = runtime.prepare_output(config, acc)
    batches = runtime.batches(config, acc, [len(ids) for ids in encoded])
    steps = config.max_steps or config.epochs * batches.per_epoch
    a2c = options.algorithm == "a2c"
    minibatch = config.batch_size if a2c else options.minibatch_size or config.batch_size
    epochs = 1 if a2c else options.ppo_epochs
    updates = epochs * math.ceil(config.batch_size / minibatch)

    # --- models: policy (trained), reference (frozen), value (trained)
    policy = runtime.load_model(AutoModelForCausalLM, config, resume, task_type="CAUSAL_LM")
    reference = runtime.load_reference(config, acc)
    first_model = next((s.model for s in options.rewards if s.model is not None), None)
    value_start = (
        resume / "value"
        if resume
        else (
            first_model
            if (options.value_from or ("reward" if first_model else "policy")) == "reward"
            else runtime.model_path(config)
        )
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(
        value_start,
        num_labels=1,
        pad_token_id=data.pad_id(tokenizer),
        dtype=torch.float32,
        **runtime.load_options(config),
    )
    value = TokenValues(runtime.checkpointed(value_model, config))
    optimizer, scheduler = runtime.optimizer_and_scheduler(
        config, torch.nn.ModuleList([policy, value]), steps * updates
    )
    policy, optimizer, value = runtime.prepare(acc, policy, optimizer, scheduler, value)
    sampler = Sampler(config, options, tokenizer, acc, "ppo-rollout")

    state, metrics = loop.begin(config, acc, resume, steps)
    position = state["position"]
    kl = (
        AdaptiveKLController(state.get("kl_beta", options.kl_beta), options.kl_target, options.kl_horizon)
        if options.kl_target
        else FixedKLController(options.kl_beta)
    )
    moments = RunningMoments(state.get("reward_moments"))

    for step in range(state["step"] + 1, steps + 1):
        indexes = batches(position)
        position += 1
        rollout = sampler(policy, [encoded[i] for i in indexes], step)
        scored = score(
            rollout,
            [conversations[i] for i in indexes],
            sampler,
            rewards,
            policy,
            reference,
            value,
            acc,
            options,
            kl,
            moments,
        )
        beta = kl.value
        kl.update(scored.token_kl.sum(1).mean().item(), len(indexes))
        started = time.perf_counter()
        logs = update(config, acc, policy, value, optimizer, scheduler, rollout, scored, step, epochs, minibatch)
        training_seconds = time.perf_counter() - started
        metrics.log(
            step,
            "train",
            {**figures(rollout, scored, logs, beta, epochs, training_seconds), "lr": scheduler.get_last_lr()[0]},
        )
        if step % config.save_every == 0 or step == steps:
            trainer_state = {"position": position, "kl_beta": kl.value, "reward_moments": moments.state()}
            checkpoint.save(
                acc,
                policy,
                tokenizer,
                config.output_dir,
                step,
                trainer_state,
                config.keep_checkpoints,
                others={"value": acc.unwrap_model(value).model},
            )
        if step == stop_after:
            break
    return finish(config, acc, policy, tokenizer, steps, stop_after, opened=(metrics, sampler, rewards))


@dataclass
class Scored:
    """A rollout scored, and the numbers frozen for its update: the policy's, the reference's and the
    value model's before any step, the per-token KL, the rewards, the advantages and returns."""

    old_logp: torch.Tensor
    old_values: torch.Tensor
    token_kl: torch.Tensor  # log pi - log pi_ref on the answer's tokens
    score: torch.Tensor  # the combined reward of each answer
    each: dict[str, torch.Tensor]  # each reward source's
    normalised: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    judge_wait: float
    seconds: float


def score(
    rollout, prompts, sampler, rewards: Rewards, policy, reference, value, acc, options, kl, moments: RunningMoments
) -> Scored:
    """The rollout's rewards (the judge's calls in flight meanwhile) and the frozen numbers the update
    compares against; the per-token reward is -beta (log pi - log pi_ref), plus the answer's reward on
    its last token; GAE over the value model's estimates."""
    started = time.perf_counter()
    ids, start, mask, attention = rollout.ids, rollout.start, rollout.mask, rollout.attention
    pending = rewards.start(prompts, sampler.texts(rollout), rollout.responses, mask)
    with torch.no_grad():
        old_logp, _ = logps_and_entropy(policy, ids, attention, start, options.temperature)
        ref_logp = reference_logps(reference, policy, acc, rollout, options.temperature)
        old_values = value(ids, attention)[:, start - 1 : -1]
    total, each, judge_wait = pending.result()
    total = total.to(acc.device)
    token_rewards = -kl_penalty(old_logp, ref_logp, kl.value) * mask
    normalised = normalise(total, options.reward_norm, moments)
    token_rewards[torch.arange(len(prompts)), mask.sum(1).long() - 1] += normalised
    advantages, returns = gae(token_rewards, old_values, options.gamma, options.lam, mask)
    centred = advantages - masked_mean(advantages, mask)
    advantages = centred / (masked_mean(centred**2, mask).sqrt() + 1e-8) * mask
    return Scored(
        old_logp,
        old_values,
        (old_logp - ref_logp) * mask,
        total,
        each,
        normalised,
        advantages,
        returns,
        judge_wait,
        time.perf_counter() - started,
    )


def update(
    config: TrainConfig,
    acc,
    policy,
    value,
    optimizer,
    scheduler,
    rollout,
    scored: Scored,
    step: int,
    epochs: int,
    minibatch: int,
) -> list[dict[str, float]]:
    """`epochs` passes of shuffled minibatches of the clipped surrogate and value losses (A2C: one
    update on the whole batch, unclipped); the figures of each update."""
    options = config.ppo
    a2c = options.algorithm == "a2c"
    ids, start, mask, attention = rollout.ids, rollout.start, rollout.mask, rollout.attention
    order = torch.Generator().manual_seed(derive_seed(config.seed, "ppo-minibatches", step))
    logs = []
    for _ in range(epochs):
        for chunk in torch.randperm(len(ids), generator=order).split(minibatch):
            logp, entropy = logps_and_entropy(
                policy, ids[chunk], attention[chunk], start, options.temperature, entropy_grad=options.entropy_coef > 0
            )
            values = value(ids[chunk], attention[chunk])[:, start - 1 : -1]
            mean_entropy = masked_mean(entropy, mask[chunk])
            clipping = {}
            if a2c:
                loss, policy_loss, value_loss = a2c_loss(
                    logp, values, scored.advantages[chunk], scored.returns[chunk], options.value_coef, mask[chunk]
                )
            else:
                policy_loss, clip_fraction = ppo_policy_loss(
                    logp, scored.old_logp[chunk], scored.advantages[chunk], options.clip_range, mask[chunk]
                )
                value_loss, value_clip_fraction = ppo_value_loss(
                    values, scored.old_values[chunk], scored.returns[chunk], options.value_clip_range, mask[chunk]
                )
                loss = policy_loss + options.value_coef * value_loss
                clipping = {"clip_fraction": clip_fraction.item(), "value_clip_fraction": value_clip_fraction.item()}
            loss = loss - options.entropy_coef * mean_entropy
            runtime.check_finite(loss, "loss", step, config.output_dir)
            acc.backward(loss)
            grad_norm = runtime.apply_gradients(
                config, acc, list(policy.parameters()) + list(value.parameters()), optimizer, scheduler, step
            )
            logs.append(
                {
                    "policy_loss": policy_loss.item(),
                    "value_loss": value_loss.item(),
                    **clipping,
                    "entropy": mean_entropy.item(),
                    "grad_norm": grad_norm.item(),
                    "approx_kl": masked_mean(scored.old_logp[chunk] - logp.detach(), mask[chunk]).item(),
                }
            )
    return logs


def figures(
    rollout, scored: Scored, logs: list[dict[str, float]], beta: float, epochs: int, training_seconds: float
) -> dict[str, float]:
    """A step's line in metrics.jsonl: rewards, KL, the updates' mean figures, lengths and where the time went."""
    answer_tokens = rollout.mask.sum().item()
    return {
        "reward": scored.score.mean().item(),
        **{f"reward_{name}": values.mean().item() for name, values in scored.each.items()},
        "reward_normalised": scored.normalised.mean().item(),
        "kl": scored.token_kl.sum(1).mean().item(),
        "kl_per_token": (scored.token_kl.sum() / answer_tokens).item(),
        "kl_beta": beta,
        **{k: sum(log[k] for log in logs) / len(logs) for k in logs[0]},
        "response_length": answer_tokens / len(rollout.ids),
        "generation_tokens_per_s": answer_tokens / rollout.generation_seconds,
        "training_tokens_per_s": epochs * rollout.attention.sum().item() / training_seconds,
        "seconds_generation": rollout.generation_seconds,
        "seconds_scoring": scored.seconds,
        "seconds_training": training_seconds,
        "seconds_weight_sync": rollout.sync_seconds,
        "seconds_judge_wait": scored.judge_wait,
    }
