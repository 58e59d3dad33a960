"""What the online trainers (PPO and A2C, GRPO, RLOO, Nash-MD) share: their start and end, the prompt
set, the frozen reference, the rollout (HF generation, or the vLLM engine holding the policy's current
weights), and the log-probs of the sampled answers under a model. Each trainer's own loop (advantages,
loss, update) stays in its recipe.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.core.errors import InputError
from cai.core.seeding import derive_seed
from cai.generate import prompts as prompt_sets
from cai.train import checkpoint, data, head, loop, runtime
from cai.train.config import TrainConfig


def setup(config: TrainConfig, instead: str):
    """The accelerator and a left-padding tokenizer (prompts end where the answers start). An online
    trainer takes one optimizer step per minibatch of its own rollout: grad_accum is refused, `instead`
    says what to set."""
    if config.grad_accum != 1:
        raise InputError(
            str(config.file), "grad_accum", f"{config.kind} takes one optimizer step per minibatch: {instead}"
        )
    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    tokenizer.padding_side = "left"
    return acc, tokenizer


def finish(config: TrainConfig, acc, policy, tokenizer, steps: int, stop_after: int | None, opened=()) -> Path:
    """Close what the run opened (metrics, engines, judges); unless it stopped early (as a kill would),
    save the final model and plot the curves. Returns OUTPUT/final."""
    for thing in opened:
        thing.close()
    if stop_after is not None and stop_after < steps:
        return config.output_dir / "final"
    tokenizer.padding_side = "right"  # the saved tokenizer pads as training and serving expect
    return loop.publish(config, acc, policy, tokenizer)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each answer's tokens up to and including its first end-of-sequence token (what follows is padding)."""
    is_eos = (responses == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generation used them."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def load_prompts(config: TrainConfig, tokenizer, max_new_tokens: int, acc) -> tuple[list[list[dict]], list[list[int]]]:
    """The prompt set's conversations and their chat-template token ids, leaving out (with a note)
    prompts with no room for `max_new_tokens` in `max_length`."""
    conversations = [list(p.messages) for p in prompt_sets.load(config.train_data)][: config.limit]
    kept, encoded = fitting_prompts(config, tokenizer, conversations, max_new_tokens, acc)
    return [conversations[i] for i in kept], [encoded[i] for i in kept]


def fitting_prompts(
    config: TrainConfig, tokenizer, conversations: list[list[dict]], max_new_tokens: int, acc, what: str = "prompt"
) -> tuple[list[int], list[list[int]]]:
    """Every conversation's chat-template prompt ids, and the indexes of those that leave room for
    `max_new_tokens` in max_length; the others are left out with a note, and none fitting is an error
    on max_length. `what` names a conversation in both ("prompt with its context")."""
    room = config.max_length - max_new_tokens
    encoded = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        for m in conversations
    ]
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= room]
    if not kept:
        raise InputError(
            str(config.file),
            "max_length",
            f"no {what} fits in max_length - {config.kind}.max_new_tokens = {room} tokens",
        )
    if len(kept) < len(encoded):
        runtime.note(
            acc,
            f"left out {len(encoded) - len(kept)} of {len(encoded)} prompts: the {what} is longer than {room} tokens",
        )
    return kept, encoded


@dataclass
class Rollout:
    """Sampled answers after their prompts: `ids` [batch, prompt + answer] (prompts left-padded),
    answers from column `start`, `mask` 1 on answer tokens, `attention` over the whole row."""

    ids: torch.Tensor
    start: int
    mask: torch.Tensor
    attention: torch.Tensor
    generation_seconds: float
    sync_seconds: float
    pad_id: int

    @property
    def responses(self) -> torch.Tensor:
        return self.ids[:, self.start :]


class Sampler:
    """Samples answers from the policy: HF `generate`, or the vLLM engine whose weights are replaced by
    the policy's before each rollout (vllm_rollout.py). Seeded per step: a resumed run samples what an
    uninterrupted one would have."""

    def __init__(self, config: TrainConfig, options, tokenizer, acc, stage: str):
        from transformers import GenerationConfig

        self.config, self.options, self.tokenizer, self.acc, self.stage = config, options, tokenizer, acc, stage
        self.pad_id, self.eos_id = data.pad_id(tokenizer), tokenizer.eos_token_id
        self.generation = GenerationConfig(
            do_sample=True,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=0,
            max_new_tokens=options.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        # under FSDP every process runs each forward pass (its layers are gathered from all) until the
        # last process's answers have ended
        self.synced = checkpoint.sharded(acc) and acc.num_processes > 1
        self.engine = None
        if options.rollout == "vllm":
            from cai.train.vllm_rollout import VLLMRollout

            self.engine = VLLMRollout(runtime.model_path(config), options.vllm_options, config.max_length)

    def __call__(self, policy, prompts: list[list[int]], step: int) -> Rollout:
        options = self.options
        started = time.perf_counter()
        sync_seconds = 0.0
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.acc.device)
        start = batch["input_ids"].shape[1]
        if self.engine is None:
            torch.manual_seed(derive_seed(self.config.seed, self.stage, step))
            model = self.acc.unwrap_model(policy)
            with torch.no_grad(), eval_mode(model):
                cache = shared_prefill(model, batch, prompts)
                ids = model.generate(
                    **batch,
                    past_key_values=cache,
                    generation_config=self.generation,
                    synced_gpus=self.synced,
                )
        else:
            sync_seconds = self.engine.sync(self.acc.unwrap_model(policy))
            answers = self.engine.generate(
                prompts,
                derive_seed(self.config.seed, self.stage, step),
                options.temperature,
                options.top_p,
                options.max_new_tokens,
            )
            ids = torch.cat([batch["input_ids"], data.pad(answers, self.pad_id).to(self.acc.device)], dim=1)
        mask = response_mask(ids[:, start:], self.eos_id)
        attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
        return Rollout(
            ids, start, mask, attention, time.perf_counter() - started - sync_seconds, sync_seconds, self.pad_id
        )

    def texts(self, rollout: Rollout) -> list[str]:
        """The answers as text, without what follows their end-of-sequence token."""
        keep = rollout.mask.long()
        return self.tokenizer.batch_decode(
            rollout.responses * keep + self.pad_id * (1 - keep), skip_special_tokens=True
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for sampling: no dropout, and a KV cache even under gradient checkpointing
    (which turns the cache off in training mode and would recompute every prefix at each new token)."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def shared_prefill(model, batch: dict, prompts: list[list[int]]):
    """The KV cache of every prompt but its last token, each distinct prompt computed once: K answers per
    prompt (consecutive repeats, as GRPO and online DPO sample) would otherwise prefill it K times, and on
    prompts of a few hundred tokens the prefill is much of the generation. `generate` continues from the
    cache and samples what it would have sampled without it. None (plain generation) when the prompts are
    not K consecutive repeats each."""
    k = 1
    while k < len(prompts) and prompts[k] == prompts[0]:
        k += 1
    start = batch["input_ids"].shape[1]
    repeated = len(prompts) % k == 0 and all(prompts[i] == prompts[i - i % k] for i in range(len(prompts)))
    if k == 1 or not repeated or start < 2:
        return None
    ids, attention = batch["input_ids"][::k, :-1], batch["attention_mask"][::k, :-1]
    cache = model(input_ids=ids, attention_mask=attention, position_ids=positions(attention), use_cache=True)
    cache = cache.past_key_values
    cache.batch_repeat_interleave(k)
    return cache


def logps_and_entropy(
    model, ids: torch.Tensor, attention: torch.Tensor, start: int, temperature: float, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of each answer token (logits at the sampling temperature) and the entropy there,
    [batch, answer columns]. Only the answer's positions go through the LM head (cai.train.head). The
    entropy carries gradients only when asked (an entropy bonus in the loss)."""
    width = ids.shape[1] - start  # position start - 1 + j predicts answer token j
    rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(width)
    columns = torch.arange(start - 1, ids.shape[1] - 1, device=ids.device).repeat(ids.shape[0])
    logp, entropy = head.picked_logps_and_entropy(
        model,
        {"input_ids": ids, "attention_mask": attention, "position_ids": positions(attention)},
        rows,
        columns,
        ids[rows, columns + 1],
        temperature,
        entropy_grad,
    )
    return logp.view(-1, width), entropy.view(-1, width)


def group_logps_and_entropy(
    model, rollout: Rollout, members: torch.Tensor, k: int, temperature: float, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logps_and_entropy` for rollouts of K answers per prompt (rows g*K .. g*K+K-1 answer prompt g),
    for the given `members` (whole groups, K consecutive indexes each): each group goes through the
    model as one packed row holding its prompt once (data.pack), so the prompt is computed once, not
    K times. Returns [len(members), answer columns] like the unpacked form, 0 past each answer's end.
    """
    lengths = rollout.mask.sum(1).long().tolist()
    rows, placed = [], []  # placed: (member's output row, packed row, its answer's length)
    for b, first in enumerate(members[::k].tolist()):
        prompt = rollout.ids[first, : rollout.start][rollout.attention[first, : rollout.start].bool()].tolist()
        answers = [rollout.ids[j, rollout.start : rollout.start + lengths[j]].tolist() for j in range(first, first + k)]
        rows.append((len(prompt), [prompt + a for a in answers]))
        placed += [(b * k + j, b, lengths[first + j]) for j in range(k)]
    batch, starts = data.pack(rows, rollout.pad_id)
    device = rollout.ids.device
    batch = {key: value.to(device) for key, value in batch.items()}
    out_row, col, row, source, token = [], [], [], [], []
    for member, b, length in placed:
        n, start = rows[b][0], starts[b][member % k]
        for t in range(length):
            out_row.append(member)
            col.append(t)
            row.append(b)
            source.append(n - 1 if t == 0 else start + t - 1)
            token.append(rows[b][1][member % k][n + t])
    dtype = next(model.parameters()).dtype
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": data.additive_mask(batch["attention_mask"], dtype),
        "position_ids": batch["position_ids"],
    }
    token_logp, entropies = head.picked_logps_and_entropy(
        model,
        inputs,
        torch.tensor(row, device=device),
        torch.tensor(source, device=device),
        torch.tensor(token, device=device),
        temperature,
        entropy_grad,
    )
    where = (torch.tensor(out_row, device=device), torch.tensor(col, device=device))
    shape = (len(members), rollout.mask.shape[1])
    logp = torch.zeros(shape, device=device, dtype=token_logp.dtype).index_put(where, token_logp)
    entropy = torch.zeros(shape, device=device, dtype=entropies.dtype).index_put(where, entropies)
    return logp, entropy


@torch.no_grad()
def reference_logps(reference, policy, acc, rollout: Rollout, temperature: float, k: int | None = None) -> torch.Tensor:
    """log pi_ref of each answer token: the frozen reference, or under LoRA the policy with its adapter
    off. With `k`, the rollout holds K answers per prompt and each prompt's go through packed."""

    def logps(model) -> torch.Tensor:
        if k is None:
            return logps_and_entropy(model, rollout.ids, rollout.attention, rollout.start, temperature)[0]
        return group_logps_and_entropy(model, rollout, torch.arange(len(rollout.ids)), k, temperature)[0]

    if reference is not None:
        return logps(reference)
    with acc.unwrap_model(policy).disable_adapter():
        return logps(policy)
