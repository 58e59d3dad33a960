"""`cai train sft`: supervised fine-tuning on `messages` records (a cai run's datasets/sft), the loss
on assistant tokens only, averaged over those tokens. Batches hold examples of similar length
(`sft.bucket_by_length`, on by default): less padding for the same examples per epoch."""

from __future__ import annotations

from pathlib import Path

import torch

from cai.core.errors import InputError
from cai.core.files import content_hash
from cai.train import data, head, loop, packing, runtime
from cai.train.config import TrainConfig, packed_row


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint, as a kill
    there would."""
    from transformers import AutoModelForCausalLM

    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))

    # --- data: validated before anything is written
    conversations = data.load_sft(config.train_data, config.limit)
    if config.eval_data is not None:
        eval_conversations = data.load_sft(config.eval_data, skip=config.eval_skip)
    else:
        keys = [content_hash(c[:-1]) for c in conversations]  # same prompt, same side of the split
        conversations, eval_conversations = data.split_eval(conversations, keys, config.eval_fraction, config.seed)
    encoded = [data.truncate(data.encode(tokenizer, c), config.max_length) for c in conversations]
    train_set = [e for e in encoded if e is not None]
    eval_set = [
        e
        for e in (data.truncate(data.encode(tokenizer, c), config.max_length) for c in eval_conversations)
        if e is not None
    ]
    if not train_set:
        raise InputError(
            str(config.train_data), None, f"no record keeps an assistant token within max_length {config.max_length}"
        )
    if len(train_set) < len(encoded):
        runtime.note(
            acc,
            f"left out {len(encoded) - len(train_set)} records with no assistant token within max_length {config.max_length}",
        )

    resume = runtime.prepare_output(config, acc)
    training = loop.start(
        config,
        acc,
        tokenizer,
        resume,
        [len(e.input_ids) for e in train_set],
        AutoModelForCausalLM,
        bucket=config.sft.bucket_by_length,
    )
    pad_id = data.pad_id(tokenizer)
    attention = acc.unwrap_model(training.model).config._attn_implementation
    capacity, _ = packed_row(config)

    def batch_values(items: list[data.Encoded], packed: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean negative log-likelihood of the assistant tokens."""
        if packed:
            batch = packed_batch(items, pad_id, attention, capacity)
        else:
            batch = data.collate(items, pad_id)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        rows, positions = batch.pop("mask")[:, 1:].nonzero(as_tuple=True)  # position t predicts token t + 1
        targets = batch["input_ids"][rows, positions + 1]
        loss = -head.picked_logps(training.model, batch, rows, positions, targets).mean()
        return loss, {"loss": loss.item(), "tokens": float(len(targets))}

    final_eval = loop.fit(
        training,
        lambda indexes: batch_values([train_set[i] for i in indexes], packed=config.packing),
        loop.evaluator(training, len(eval_set), lambda indexes: batch_values([eval_set[i] for i in indexes])[1]),
        stop_after,
    )
    if final_eval is None:
        return config.output_dir / "final"
    return loop.publish(config, acc, training.model, tokenizer)


def packed_batch(items: list[data.Encoded], pad_id: int, attention: str, capacity: int) -> dict[str, torch.Tensor]:
    """The items concatenated into rows of at most `capacity` tokens (packing.rows): `input_ids`,
    `position_ids` restarting at each item, the loss `mask` (an item's first token is never trained: it
    would be predicted from the item before it), and an attention mask that keeps each item to itself
    (data.attention_mask), none for flash attention, which reads the item boundaries from the position
    ids (transformers' padding-free path)."""
    layout = packing.rows([len(e.input_ids) for e in items], capacity)
    batch, _ = data.pack([(0, [items[i].input_ids for i in row]) for row in layout], pad_id)
    mask = data.pad([[m if k else 0 for i in row for k, m in enumerate(items[i].mask)] for row in layout], 0)
    out = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "mask": mask}
    if attention != "flash_attention_2":
        out["attention_mask"] = data.attention_mask(batch["attention_mask"], attention, torch.float32)
    return out
