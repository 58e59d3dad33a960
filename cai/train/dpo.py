"""`cai train dpo`: direct preference optimisation of a policy against a frozen reference, and the
preference losses of the same shape (`dpo.loss_type`).

The reference is the starting model unless `dpo.reference` names another; with LoRA it is the policy
with its adapter switched off (no second copy). `dpo.precompute_ref` computes the reference
log-probs once before training and caches them in the output folder, after which the reference
model is freed. Chosen and rejected answers go through the policy in one forward pass, each pair as
one row that holds the prompt once (data.collate_pairs).
`dpo.use_soft_labels` trains on each pair's `label_prob` (conservative DPO with the judge's own
confidence per pair).

The other loss types, each a pure function in cai.train.losses, on the same loop:
- `cpl` (Contrastive Preference Learning), `simpo` (SimPO) and `orpo` (ORPO) are reference-free: no
  reference model is loaded at all. SimPO and ORPO read each answer's mean per-token log-prob, not the sum.
  Their chosen/rejected rewards are alpha log pi (cpl), beta times the mean log-prob (simpo) and the
  answers' log-odds (orpo); orpo also logs `nll`, its SFT term.
- `kto` (KTO) trains on answers labelled desirable or not: TRL's unpaired rows (prompt, completion, label),
  or pairs, each giving a desirable and an undesirable answer (`batch_size` then counts answers). Each
  answer goes through the model in one packed row with its batch neighbour's answer to the same prompt
  (data.swap_answer, data.kl_partners), whose log-ratio to the reference estimates the KL reference point
  z0. Metrics: `kl_reference` (z0), `reward_accuracy` (the share of answers on their label's side of z0)
  and `reward_margin` (the mean beta (r - z0), sign-flipped for undesirable answers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cai.core.disk import written_atomically
from cai.core.errors import InputError
from cai.train import data, head, loop, runtime
from cai.train.config import REFERENCE_FREE_LOSSES, TrainConfig, packed_row
from cai.train.losses import cpl_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss

PER_TOKEN_MEAN = ("ipo", "simpo", "orpo")  # losses on each answer's mean token log-prob, not its sum


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint, as a kill
    there would (tests use it to check that a rerun resumes exactly)."""
    from transformers import AutoModelForCausalLM

    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    options = config.dpo
    kto = options.loss_type == "kto"

    # --- data: validated before anything is written
    if kto:
        examples, eval_examples = data.example_splits(config)
        train_set, dropped = data.encode_examples(tokenizer, examples, config.max_length)
        eval_set, _ = data.encode_examples(tokenizer, eval_examples, config.max_length)
        what = "answers"
        # an answer's row also holds a neighbour's answer of about its length
        lengths = [2 * len(e.encoded.input_ids) - e.answer_start for e in train_set]
    else:
        pairs, eval_pairs = data.preference_splits(config)
        if options.use_soft_labels:
            data.require_column(config, pairs, "label_prob", "dpo.use_soft_labels")
        train_set, dropped = data.encode_pairs(tokenizer, pairs, config.max_length)
        eval_set, _ = data.encode_pairs(tokenizer, eval_pairs, config.max_length)
        what = "pairs"
        if config.packing:
            lengths = [data.packed_length(p) for p in train_set]
        else:
            lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_set]
    if not train_set:
        raise InputError(
            str(config.train_data), None, f"no {what[:-1]} keeps an answer token within max_length {config.max_length}"
        )
    if dropped:
        runtime.note(acc, f"left out {dropped} {what} with no answer token within max_length {config.max_length}")

    resume = runtime.prepare_output(config, acc)
    training = loop.start(config, acc, tokenizer, resume, lengths, AutoModelForCausalLM)
    policy = training.model
    reference_free = options.loss_type in REFERENCE_FREE_LOSSES
    reference = None if reference_free else runtime.load_reference(config, acc, options.reference)
    pad_id = data.pad_id(tokenizer)
    attention = acc.unwrap_model(policy).config._attn_implementation  # the reference loads with the same

    def logps(model, items: list[data.EncodedPair], packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = packed_row(config)[0] if packed else None
        return pair_logps(model, items, pad_id, acc.device, options.loss_type in PER_TOKEN_MEAN, capacity, attention)

    @torch.no_grad()
    def reference_logps(items: list[data.EncodedPair], packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is not None:
            return logps(reference, items, packed)
        with acc.unwrap_model(policy).disable_adapter():
            return logps(policy, items, packed)

    cached = _precomputed(config, acc, reference_logps, train_set, eval_set) if options.precompute_ref else None
    if cached is not None:
        reference = None  # frees the reference model: its numbers are all in `cached`

    def pair_values(
        items: list[data.EncodedPair], indexes: list[int], split: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        packed = config.packing and split == "train"  # a training batch is packed into rows; evaluation pads
        chosen, rejected = logps(policy, items, packed)
        label_prob = torch.tensor([p.label_prob for p in items], device=acc.device) if options.use_soft_labels else None
        figures = {}
        if options.loss_type == "cpl":
            losses, chosen_rewards, rejected_rewards = cpl_loss(
                chosen, rejected, options.beta, options.cpl_lambda, label_prob
            )
        elif options.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen, rejected, options.beta, options.simpo_gamma, label_prob
            )
        elif options.loss_type == "orpo":
            losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, options.orpo_lambda, label_prob)
            figures["nll"] = -chosen.mean().item()
        else:
            if cached is None:
                ref_chosen, ref_rejected = reference_logps(items, packed)
            else:
                ref_chosen, ref_rejected = (cached[split][indexes].to(acc.device)).unbind(dim=1)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, options.beta, options.loss_type, label_prob
            )
            # mean log pi/pi_ref over the data's answers: the KL on these answers, not on samples of pi
            figures["kl_estimate"] = ((chosen_rewards + rejected_rewards) / (2 * options.beta)).mean().item()
        loss = losses.mean()
        return loss, {
            "loss": loss.item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            **figures,
        }

    def kto_values(items: list[data.EncodedExample]) -> tuple[torch.Tensor, dict[str, float]]:
        # each answer in one row with the answer of a batch neighbour to another prompt after the same prompt
        partners = data.kl_partners([e.group for e in items])
        rows = [
            data.EncodedPair(e.encoded, data.swap_answer(e, items[j] if j is not None else e, config.max_length), None)
            for e, j in zip(items, partners)
        ]
        answers, mismatched = logps(policy, rows)
        ref_answers, ref_mismatched = reference_logps(rows)
        has_partner = torch.tensor([j is not None for j in partners], device=acc.device)
        desirable = torch.tensor([e.label for e in items], device=acc.device)
        losses, rewards, z0 = kto_loss(
            answers,
            ref_answers,
            desirable,
            mismatched[has_partner],
            ref_mismatched[has_partner],
            options.beta,
            options.kto_desirable_weight,
            options.kto_undesirable_weight,
        )
        loss = losses.mean()
        side = torch.where(desirable, 1.0, -1.0) * (rewards - options.beta * z0)  # > 0: on the label's side of z0
        return loss, {
            "loss": loss.item(),
            "reward_accuracy": (side > 0).float().mean().item(),
            "reward_margin": side.mean().item(),
            "kl_reference": z0.item(),
            "kl_estimate": (rewards / options.beta).mean().item(),
        }

    def step_values(indexes: list[int], split: str) -> tuple[torch.Tensor, dict[str, float]]:
        items = [(train_set if split == "train" else eval_set)[i] for i in indexes]
        return kto_values(items) if kto else pair_values(items, indexes, split)

    final_eval = loop.fit(
        training,
        lambda indexes: step_values(indexes, "train"),
        loop.evaluator(training, len(eval_set), lambda indexes: step_values(indexes, "eval")[1]),
        stop_after,
    )
    if final_eval is None:
        return config.output_dir / "final"
    return loop.publish(config, acc, policy, tokenizer)


def _precomputed(config: TrainConfig, acc, reference_logps, train_set, eval_set) -> dict[str, torch.Tensor]:
    """Reference (chosen, rejected) log-probs of every pair, [N, 2] per split, computed once and cached
    in OUTPUT/reference_logps.pt (the recorded config guarantees they belong to this run)."""
    path = config.output_dir / "reference_logps.pt"
    if path.exists():
        return torch.load(path)
    size = config.eval_batch_size or config.batch_size
    out = {}
    for split, items in (("train", train_set), ("eval", eval_set)):
        rows = [
            torch.stack(reference_logps(items[i : i + size]), dim=1).float().cpu() for i in range(0, len(items), size)
        ]
        out[split] = torch.cat(rows) if rows else torch.zeros(0, 2)
    if acc.is_main_process:
        with written_atomically(path) as tmp:
            torch.save(out, tmp)
    return out


def pair_logps(
    model,
    items: list[data.EncodedPair],
    pad_id: int,
    device,
    per_token_mean: bool = False,
    capacity: int | None = None,
    attention: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs from one forward pass over both, the shared prompt
    computed once (data.collate_pairs; with a `capacity`, pairs packed into rows of that many tokens); per-token means
    instead of sums for IPO, SimPO and ORPO. `attention`: the model's attention implementation, which
    says the mask's form (data.attention_mask)."""
    batch = data.collate_pairs(items, pad_id, capacity)
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = data.attention_mask(batch["attention_mask"], attention, next(model.parameters()).dtype)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    token_logps = head.picked_logps(model, inputs, batch["row"], batch["source"], batch["token"])
    values = torch.zeros(2 * len(items), dtype=token_logps.dtype, device=device).index_add(
        0, batch["sequence"], token_logps
    )
    if per_token_mean:
        values = values / torch.bincount(batch["sequence"], minlength=2 * len(items))
    return values[: len(items)], values[len(items) :]
