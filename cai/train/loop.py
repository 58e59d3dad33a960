"""The one loop of the trainers that learn from a fixed dataset (SFT, reward model, DPO/IPO/CPL, HIR,
context distillation, judge): their set-up (`start`), batches by position (a resumed run asks for the
batch it stopped at), gradient accumulation, clipping, the guard against non-finite numbers, metrics,
held-out evaluation (`evaluator`) and checkpoints. Each trainer brings its data and its loss.

Rejection sampling, ReST and HIR sample first, then train through this loop (the first two through
`sft`). The online trainers (PPO/A2C, GRPO/RLOO, Nash-MD) share only `begin` and `publish` with it:
sampling, scoring and updating differ per algorithm, so each keeps its own step loop on purpose
(cai/train/rollout.py holds what they share)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


@dataclass
class Training:
    """An offline trainer's model with its optimizer and schedule, its batches, its length in steps and
    the checkpoint it goes on from: what `start` sets up the same way for each trainer."""

    config: TrainConfig
    acc: Any
    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    batches: data.Batches
    steps: int
    resume: Path | None


def start(
    config: TrainConfig,
    acc,
    tokenizer,
    resume: Path | None,
    lengths: list[int],
    model_class,
    task_type: str = "CAUSAL_LM",
    bucket: bool = True,
    **model_kwargs,
) -> Training:
    """Batches over items of these token lengths, the steps they make, and the model to train (from
    `config.model` or the checkpoint `resume`) with its optimizer, prepared by accelerate."""
    batches = runtime.batches(config, acc, lengths, bucket)
    steps = runtime.total_steps(config, batches.per_epoch)
    model, optimizer, scheduler = runtime.trainable(config, acc, resume, steps, model_class, task_type, **model_kwargs)
    return Training(config, acc, tokenizer, model, optimizer, scheduler, batches, steps, resume)


def evaluator(
    training: Training,
    count: int,
    chunk_figures: Callable[[list[int]], dict[str, float]],
    combine: Callable[[list[dict[str, float]]], dict[str, float]] = mean,
) -> Callable[[], dict[str, float]] | None:
    """The evaluation of `count` held-out items, in chunks of eval_batch_size (or batch_size) without
    gradients, their figures combined (a plain mean by default); None when there is nothing to evaluate."""
    if count == 0:
        return None
    config, model = training.config, training.model
    size = config.eval_batch_size or config.batch_size

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        results = [chunk_figures(list(range(i, min(i + size, count)))) for i in range(0, count, size)]
        model.train()
        return combine(results)

    return evaluate


def fit(
    training: Training,
    batch_loss: BatchLoss,
    evaluate: Callable[[], dict[str, float]] | None = None,
    stop_after: int | None = None,
) -> dict[str, float] | None:
    """Train from the checkpoint `training.resume` (or the start) to step `training.steps`, evaluating at
    the start, every `eval_every` steps and at the end. Returns the last evaluation's figures ({} without
    `evaluate`), or None when it stopped right after step `stop_after`'s checkpoint, as a kill there would."""
    config, acc, model, steps = training.config, training.acc, training.model, training.steps
    state, metrics = begin(config, acc, training.resume, steps)
    position = state["position"]
    last_eval: dict[str, float] = {}
    if state["step"] == 0 and evaluate is not None:
        metrics.log(0, "eval", evaluate())
    model.train()
    for step in range(state["step"] + 1, steps + 1):
        logs = []
        for micro in range(config.grad_accum):
            indexes = training.batches(position)
            position += 1
            with runtime.sync_gradients_on(acc, model, micro, config.grad_accum):
                loss, values = batch_loss(indexes)
                runtime.check_finite(loss, "loss", step, config.output_dir)
                acc.backward(loss / config.grad_accum)
            logs.append(values)
        grad_norm = runtime.apply_gradients(
            config, acc, model.parameters(), training.optimizer, training.scheduler, step
        )
        metrics.log(
            step, "train", {**mean(logs), "grad_norm": grad_norm.item(), "lr": training.scheduler.get_last_lr()[0]}
        )
        if evaluate is not None and (step == steps or (config.eval_every and step % config.eval_every == 0)):
            last_eval = evaluate()
            metrics.log(step, "eval", last_eval)
        if step % config.save_every == 0 or step == steps:
            checkpoint.save(
                acc, model, training.tokenizer, config.output_dir, step, {"position": position}, config.keep_checkpoints
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
