"""`cai train nash-md`: Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback"), the policy
trained towards the Nash equilibrium of a pairwise preference rather than the maximum of a reward.

Each step, for each of `batch_size` prompts: an answer y ~ pi (the policy) and an opponent answer
y' ~ pi^beta, the geometric mixture pi^(1 - beta) mu^beta of the policy and the reference mu
(`mixture_coef` is beta; sampled token by token, each token from the renormalised mixture of both
models' next-token distributions: the paper's practical approximation of the sequence-level mixture,
losses.geometric_mixture_logprobs). The preference source gives P(y > y' | x): a reward model's
Bradley-Terry sigmoid(r(y) - r(y')), or the judge asked in both orders. The update is Nash-MD-PG's
(losses.nash_md_loss): REINFORCE on P - 1/2, with the KL to the reference (`kl_beta`, the paper's tau)
through its own REINFORCE term.

The metric Nash-MD is judged by is `win_rate`: the mean P(y > y_ref) of the step's policy answers
against answers sampled from the reference on the same prompts (1/2 at the start, where pi = mu); it is
computed every step, or every `eval_every` steps and at the last when that is set (it costs a reference
rollout and one preference per prompt).

The judge's calls go out while the trainer computes log-probs, as in GRPO; the rollouts of the policy
and the reference are GRPO's (rollout.Sampler, HF generation: the mixture needs both models' logits at
every token, which no single engine samples, so there is no vLLM rollout).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from cai.core.seeding import derive_seed
from cai.train import checkpoint, data, loop, runtime
from cai.train.config import TrainConfig
from cai.train.losses import geometric_mixture_logprobs, masked_mean, nash_md_loss
from cai.train.reward import Preference
from cai.train.rollout import (
    Rollout,
    Sampler,
    eval_mode,
    finish,
    load_prompts,
    logps_and_entropy,
    positions,
    reference_logps,
    response_mask,
    setup,
)


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint."""
    from transformers import AutoModelForCausalLM

    options = config.nash_md
    acc, tokenizer = setup(config, "raise batch_size instead (a minibatch is the whole batch)")

    # --- prompts and the preference source: validated before anything is written
    conversations, encoded = load_prompts(config, tokenizer, options.max_new_tokens, acc)
    preference = Preference(options.preference, acc.device, config.seed, runtime.load_options(config))

    resume = runtime.prepare_output(config, acc)
    batches = runtime.batches(config, acc, [len(ids) for ids in encoded])
    steps = config.max_steps or config.epochs * batches.per_epoch

    # --- models: policy (trained), reference (frozen: the mixture's other half, the KL's and the win rate's)
    policy, optimizer, scheduler = runtime.trainable(config, acc, resume, steps, AutoModelForCausalLM, "CAUSAL_LM")
    reference = runtime.load_reference(config, acc)
    sampler = Sampler(config, options, tokenizer, acc, "nash-md-rollout")
    reference_sampler = Sampler(config, options, tokenizer, acc, "nash-md-reference")
    mixture_sampler = MixtureSampler(config, tokenizer, acc)

    def as_reference():
        """The reference model, or under LoRA the policy with its adapter off."""
        return contextlib.nullcontext(reference) if reference is not None else _adapter_off(acc.unwrap_model(policy))

    state, metrics = loop.begin(config, acc, resume, steps)
    position = state["position"]

    for step in range(state["step"] + 1, steps + 1):
        indexes = batches(position)
        position += 1
        prompts = [conversations[i] for i in indexes]
        prompt_ids = [encoded[i] for i in indexes]
        measure = config.eval_every is None or step % config.eval_every == 0 or step == steps

        # --- rollouts: the reference's first (when the win rate is due), so that the policy's sampler,
        # seeded per step, leaves the same random state whether or not it ran
        started = time.perf_counter()
        if measure:
            with as_reference() as model:
                baseline = reference_sampler(model, prompt_ids, step)
        rollout = sampler(policy, prompt_ids, step)
        unwrapped = acc.unwrap_model(policy)
        with eval_mode(unwrapped):
            opponent = mixture_sampler(
                unwrapped, reference if reference is not None else unwrapped, prompt_ids, step, options
            )
        generation_seconds = time.perf_counter() - started

        # --- preferences (the judge's calls in flight while the log-probs are computed)
        started = time.perf_counter()
        answers = sampler.texts(rollout)
        against_mixture = preference.start(prompts, answers, sampler.texts(opponent))
        against_reference = preference.start(prompts, answers, sampler.texts(baseline)) if measure else None
        ref_logp = (
            reference_logps(reference, policy, acc, rollout, options.temperature) if options.kl_beta > 0 else None
        )
        reference_seconds = time.perf_counter() - started
        started = time.perf_counter()
        p = against_mixture().to(acc.device)
        win_rate = against_reference().mean().item() if against_reference is not None else None
        preference_seconds = time.perf_counter() - started

        # --- update
        started = time.perf_counter()
        mask = rollout.mask
        logp, entropy = logps_and_entropy(policy, rollout.ids, rollout.attention, rollout.start, options.temperature)
        loss, kl = nash_md_loss(logp, ref_logp, p, options.kl_beta, mask)
        runtime.check_finite(loss, "loss", step, config.output_dir)
        acc.backward(loss)
        grad_norm = runtime.apply_gradients(config, acc, policy.parameters(), optimizer, scheduler, step)
        training_seconds = time.perf_counter() - started

        answer_tokens = mask.sum().item()
        values = {
            **({"win_rate": win_rate} if win_rate is not None else {}),
            "preference_vs_mixture": p.mean().item(),
            "loss": loss.item(),
            "entropy": masked_mean(entropy, mask).item(),
            "grad_norm": grad_norm.item(),
            "response_length": answer_tokens / len(indexes),
            "mixture_response_length": opponent.mask.sum().item() / len(indexes),
            "seconds_generation": generation_seconds,
            "seconds_reference": reference_seconds,
            "seconds_preference_wait": preference_seconds,
            "seconds_training": training_seconds,
            "lr": scheduler.get_last_lr()[0],
        }
        if ref_logp is not None:
            values["kl"] = kl.mean().item()
            values["kl_per_token"] = kl.sum().item() / answer_tokens
        metrics.log(step, "train", values)
        if step % config.save_every == 0 or step == steps:
            checkpoint.save(
                acc, policy, tokenizer, config.output_dir, step, {"position": position}, config.keep_checkpoints
            )
        if step == stop_after:
            break
    return finish(config, acc, policy, tokenizer, steps, stop_after, opened=(metrics, preference))


@contextlib.contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield model


class MixtureSampler:
    """Samples answers from the geometric mixture of the policy and the reference, token by token: both
    models run side by side, each with its own KV cache, and each token is drawn from
    geometric_mixture_logprobs of their next-token logits (at the sampling temperature, with top-p as the
    policy's rollout has it). Seeded per step: a resumed run samples what an uninterrupted one would have.
    Under LoRA the two are one model with its adapter on and off: `reference` is then that model, the
    adapter switched around each of its forward passes."""

    def __init__(self, config: TrainConfig, tokenizer, acc):
        self.config, self.tokenizer, self.acc = config, tokenizer, acc
        self.pad_id, self.eos_id = data.pad_id(tokenizer), tokenizer.eos_token_id

    @torch.no_grad()
    def __call__(self, policy, reference, prompts: list[list[int]], step: int, options) -> Rollout:
        from transformers import TopPLogitsWarper

        beta = options.mixture_coef
        started = time.perf_counter()
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.acc.device)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        start = ids.shape[1]
        generator = torch.Generator(device=ids.device).manual_seed(
            derive_seed(self.config.seed, "nash-md-mixture", step)
        )
        top_p = TopPLogitsWarper(options.top_p) if options.top_p < 1.0 else None
        lora = reference is policy
        # a model whose weight in the mixture is 0 is not run at all
        models = {
            name: model
            for name, model, weight in (("policy", policy, 1 - beta), ("reference", reference, beta))
            if weight > 0
        }
        caches: dict[str, object] = {name: None for name in models}

        def next_logits(name: str, model, new_ids: torch.Tensor) -> torch.Tensor:
            adapter = model.disable_adapter() if lora and name == "reference" else contextlib.nullcontext()
            with adapter:
                out = model(
                    input_ids=new_ids,
                    attention_mask=attention,
                    position_ids=positions(attention)[:, -new_ids.shape[1] :],
                    past_key_values=caches[name],
                    use_cache=True,
                    logits_to_keep=1,
                )
            caches[name] = out.past_key_values
            return out.logits[:, -1].float()

        new_ids = ids
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
        for _ in range(options.max_new_tokens):
            logits = {name: next_logits(name, model, new_ids) for name, model in models.items()}
            if len(logits) == 2:
                scores = geometric_mixture_logprobs(logits["policy"], logits["reference"], beta)
            else:
                (scores,) = logits.values()
            scores = scores / options.temperature
            if top_p is not None:
                scores = top_p(ids, scores)
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            finished |= token == self.eos_id
            ids = torch.cat([ids, token[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(token)[:, None]], dim=1)
            new_ids = token[:, None]
            if finished.all():
                break
        mask = response_mask(ids[:, start:], self.eos_id)
        attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
        return Rollout(ids, start, mask, attention, time.perf_counter() - started, 0.0, self.pad_id)
