"""The loop of the trainers that learn from a fixed dataset (SFT, reward model, DPO, HIR): batches by
position (a resumed run asks for the batch it stopped at), gradient accumulation, clipping, the guard
against non-finite numbers, metrics, evaluation and checkpoints. Each trainer brings its loss."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cai.train import checkpoint, data, runtime
from cai.train.config import TrainConfig
from cai.train.metrics import MetricsLog, mean, plot

BatchLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]  # item indexes -> (loss, figures)


def begin(config: TrainConfig, acc, resume: Path | None, steps: int) -> tuple[dict, MetricsLog]:
    """Where a training goes on from (the checkpoint `resume`'s state, or step 0 at data position 0) and
    its metrics log, trimmed to that step."""
    state = checkpoint.restore(acc, resume) if resume else {"step": 0, "position": 0}
    return state, MetricsLog.open(config, acc, state["step"], steps)


def fit(
    config: TrainConfig,
    acc,
    model,
    tokenizer,
    optimizer,
    scheduler,
    batches: data.Batches,
    steps: int,
    resume: Path | None,
    batch_loss: BatchLoss,
    evaluate: Callable[[], dict[str, float]] | None = None,
    stop_after: int | None = None,
) -> dict[str, float] | None:
    """Train from the checkpoint `resume` (or the start) to step `steps`, evaluating at the start, every
    `eval_every` steps and at the end. Returns the last evaluation's figures ({} without `evaluate`), or
    None when it stopped right after step `stop_after`'s checkpoint, as a kill there would."""
    state, metrics = begin(config, acc, resume, steps)
    position = state["position"]
    last_eval: dict[str, float] = {}
    if state["step"] == 0 and evaluate is not None:
        metrics.log(0, "eval", evaluate())
    model.train()
    for step in range(state["step"] + 1, steps + 1):
        logs = []
        for micro in range(config.grad_accum):
            indexes = batches(position)
            position += 1
            with runtime.sync_gradients_on(acc, model, micro, config.grad_accum):
                loss, values = batch_loss(indexes)
                runtime.check_finite(loss, "loss", step, config.output_dir)
                acc.backward(loss / config.grad_accum)
            logs.append(values)
        grad_norm = runtime.apply_gradients(config, acc, model.parameters(), optimizer, scheduler, step)
        metrics.log(step, "train", {**mean(logs), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]})
        if evaluate is not None and (step == steps or (config.eval_every and step % config.eval_every == 0)):
            last_eval = evaluate()
            metrics.log(step, "eval", last_eval)
        if step % config.save_every == 0 or step == steps:
            checkpoint.save(
                acc, model, tokenizer, config.output_dir, step, {"position": position}, config.keep_checkpoints
            )
        if step == stop_after:
            metrics.close()
            return None
    metrics.close()
    return last_eval


def publish(config: TrainConfig, acc, model, tokenizer) -> Path:
    """OUTPUT/final (the trained model and its tokenizer) and OUTPUT/curves.png."""
    final = checkpoint.save_final(acc, model, tokenizer, config.output_dir)
    if acc.is_main_process:
        plot(config.output_dir / "metrics.jsonl", config.output_dir / "curves.png")
    return final
