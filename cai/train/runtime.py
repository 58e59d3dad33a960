"""What every trainer sets up the same way: the accelerator and precision, models (from the start or a
checkpoint, LoRA or full), optimizer and LR schedule, and the guard against non-finite numbers."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import torch

from cai.core import logs, models
from cai.core.errors import InputError
from cai.train import checkpoint, data
from cai.train.config import FSDP_KINDS, TrainConfig, packed_row


def note(acc, message: str) -> None:
    """A line for the person running the training (on the terminal, also while library output goes to
    OUTPUT/train.log), from the main process only."""
    if acc.is_main_process:
        print(message, file=logs.terminal(), flush=True)


def apply_gradients(config: TrainConfig, acc, parameters, optimizer, scheduler, step: int) -> torch.Tensor:
    """One optimizer step on the accumulated gradients: clipped to max_grad_norm (a non-finite norm stops
    the training), then the schedule's step. Returns the gradient norm before clipping."""
    grad_norm = acc.clip_grad_norm_(parameters, config.max_grad_norm)
    check_finite(grad_norm, "gradient norm", step, config.output_dir)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return grad_norm


class NonFiniteError(Exception):
    """A loss or gradient norm that is nan or inf: training stops, the last good checkpoint stays."""


def accelerator(config: TrainConfig):
    """fp32 on CPU; bf16 autocast over fp32 weights on a GPU that supports it (`precision: auto`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per checkpoint write buries the training log

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        # set by `accelerate launch` for a DeepSpeed config; checked before accelerate fails on it
        raise InputError(
            "the accelerate config",
            "distributed_type",
            "cai does not run under DeepSpeed (untested here: it has no CPU build); shard with FSDP2 instead "
            "(distributed_type: FSDP, fsdp_version: 2; README, Several processes and FSDP)",
        )
    if config.precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = config.precision == "bf16"
    # cpu=True without a GPU: accelerate then takes `accelerate launch --multi_gpu` / torchrun processes
    # as one CPU run over gloo; left out, each process trains alone on all the data
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())
    if checkpoint.sharded(acc):
        check_sharding(config, acc)
    checkpoint.skip_model_weights(acc)
    set_seed(config.seed)
    return acc


def full_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights whole, on the CPU in fp32, on every process (each process's vLLM engine loads
    them). Sharded weights are gathered one at a time, so no device holds more than one whole weight
    beyond its own slices. Tied weights appear once: safetensors refuses aliased tensors, and vLLM ties
    them again itself."""
    from torch.distributed.tensor import DTensor

    persistent = model.state_dict().keys()
    named = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", torch.float32).contiguous()
        for name, t in named.items()
    }


def check_sharding(config: TrainConfig, acc) -> None:
    """FSDP2 for the trainers whose every step runs the same collectives on every process."""
    if not acc.is_fsdp2:
        raise InputError(
            "the accelerate config",
            "fsdp_config.fsdp_version",
            "cai shards with FSDP2 (its weights are DTensors, gathered one by one to save or sync): set it to 2",
        )
    if config.kind not in FSDP_KINDS:
        raise InputError(
            str(config.file),
            None,
            f"`cai train {config.kind}` does not run under FSDP yet (it runs on {', '.join(FSDP_KINDS)}); "
            "launch it without an FSDP accelerate config (DDP: --multi_gpu)",
        )


def prepare_output(config: TrainConfig, acc) -> Path | None:
    """Check the config against the output folder, clear half-written checkpoints, check optional
    tools; return the checkpoint to resume from (None for a fresh start)."""
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise InputError(
                str(config.file),
                "tensorboard",
                "tensorboard is not installed (pip install tensorboard), or set it to false",
            ) from None
    if acc.is_main_process:
        checkpoint.record_config(config)
        for stale in (config.output_dir / "checkpoints").glob(".step-*.tmp"):
            shutil.rmtree(stale)
    acc.wait_for_everyone()
    resume = checkpoint.latest(config.output_dir)
    if resume is not None and checkpoint.is_sharded(resume) != checkpoint.sharded(acc):
        held, now = (
            ("FSDP shards", "without FSDP") if checkpoint.is_sharded(resume) else ("whole weights", "under FSDP")
        )
        raise InputError(
            str(config.file),
            None,
            f"{resume} holds {held} and this run is launched {now}: resume it the way it was launched",
        )
    return resume


def model_path(config: TrainConfig, name: str | None = None) -> str:
    """The folder for a config's model name: embedded models are prepared on first use."""
    return models.resolve(name or config.model, config.base_dirs)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_options(config: TrainConfig) -> dict:
    """What every model load of a training passes to `from_pretrained`, trained and frozen models alike."""
    return {} if config.attn_implementation is None else {"attn_implementation": config.attn_implementation}


def checkpointed(model, config: TrainConfig):
    """The model with gradient checkpointing when the config asks for it: non-reentrant, which gives the
    same gradients, works under LoRA without making the inputs require grad, and lets a layer's
    outputs that carry no gradient through. The KV cache is off in training (it would be recomputed);
    generation, in eval mode, still uses one."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_model(cls, config: TrainConfig, resume: Path | None, task_type: str, **kwargs):
    """The model to train: from `config.model`, or from the checkpoint to resume (a LoRA checkpoint
    holds the adapter only: it goes on top of the base model)."""
    start = model_path(config)
    kwargs = {**load_options(config), **kwargs}
    # a sharded checkpoint's weights are loaded into the prepared model with the optimizer (restore)
    if resume is not None and config.lora is None and not checkpoint.is_sharded(resume):
        return checkpointed(cls.from_pretrained(resume, dtype=torch.float32, **kwargs), config)
    model = checkpointed(cls.from_pretrained(start, dtype=torch.float32, **kwargs), config)
    if config.lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume is not None:
        return PeftModel.from_pretrained(model, resume, is_trainable=True)
    lora = config.lora
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type=task_type,
        ),
    )


def load_reference(config: TrainConfig, acc, model: str | None = None):
    """The frozen reference: `model` or the starting model, in bf16 under bf16 mixed precision (it has no
    optimizer, so it needs no fp32 master weights: half the memory), else fp32. None under LoRA when no
    `model` is named: the policy with its adapter switched off is then the reference, with no second copy.
    Under `reference_offload: cpu` its weights stay in CPU memory, each layer's brought to the device for
    its forward pass only (the policy then has the GPU's memory to itself, at the price of a transfer
    of the reference's weights per pass)."""
    from transformers import AutoModelForCausalLM

    if config.lora is not None and model is None:
        return None
    dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
    reference = AutoModelForCausalLM.from_pretrained(model_path(config, model), dtype=dtype, **load_options(config))
    reference.eval().requires_grad_(False)
    offload = config.reference_offload == "cpu"
    if checkpoint.sharded(acc):
        return shard_frozen(reference, acc, offload)
    if offload:
        from accelerate import cpu_offload

        return cpu_offload(reference, execution_device=acc.device)
    return reference.to(acc.device)


def shard_frozen(model, acc, offload: bool = False):
    """A frozen model split like the trained one under FSDP (each decoder layer a unit, moved to the
    device slice by slice, gathered for its forward pass and freed after): a whole copy per process
    would take the memory sharding saves. Its weights come from the first process, as accelerate.prepare
    does for the trained model: under cpu_ram_efficient_loading (accelerate launch's default) transformers
    loads them there only and zeros elsewhere. `offload`: the slices stay in CPU memory, each unit's
    brought to the device for its forward pass."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    whole = model.state_dict() if acc.is_main_process else {}
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    layers = set(model._no_split_modules or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def loaded_everywhere(model):
    """A model loaded outside accelerate.prepare and kept whole, with the first process's weights on
    every process: under FSDP's cpu_ram_efficient_loading, transformers loads them on the first process
    only (zeros elsewhere, for prepare to broadcast)."""
    from transformers.integrations import is_fsdp_enabled

    if is_fsdp_enabled():
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    return model


def trainable(config: TrainConfig, acc, resume: Path | None, optimizer_steps: int, cls, task_type: str, **kwargs):
    """(model, optimizer, scheduler): the model to train (load_model), its optimizer and schedule over
    `optimizer_steps` steps, prepared by accelerate."""
    model = load_model(cls, config, resume, task_type, **kwargs)
    optimizer, scheduler = optimizer_and_scheduler(config, model, optimizer_steps)
    model, optimizer = prepare(acc, model, optimizer, scheduler)
    return model, optimizer, scheduler


def batches(config: TrainConfig, acc, lengths: list[int], bucket: bool = False) -> data.Batches:
    """The batches of items of these token lengths (bucketed by length or not, or packed), this process's share."""
    if config.packing:
        capacity, rows = packed_row(config)
        return data.PackedBatches(
            lengths, capacity, rows, config.seed, rank=acc.process_index, world_size=acc.num_processes
        )
    return data.Batches(
        lengths, config.batch_size, config.seed, bucket=bucket, rank=acc.process_index, world_size=acc.num_processes
    )


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    return config.max_steps or config.epochs * math.ceil(batches_per_epoch / config.grad_accum)


def optimizer_and_scheduler(config: TrainConfig, model, steps: int):
    """AdamW without weight decay on biases and norms (the usual split), warmup then the schedule."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    # fused: one kernel over all parameters; measured on this CPU with SmolLM2, 0.2 s a step instead
    # of about 1 s, and less peak memory (benchmarks/rm_vs_trl.py)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=True,
    )
    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=steps
    )
    return optimizer, scheduler


def prepare(acc, model, optimizer, scheduler, *others):
    """(model, optimizer, *others) prepared by accelerate. The scheduler stays outside
    accelerate.prepare, which would step it once per process; it is registered for checkpointing instead."""
    model, optimizer, *others = acc.prepare(model, optimizer, *others)
    acc.register_for_checkpointing(scheduler)
    return (model, optimizer, *others)


def sync_gradients_on(acc, model, micro: int, grad_accum: int):
    """Under DDP, all-reduce gradients only on the last micro-batch of a step."""
    return contextlib.nullcontext() if micro == grad_accum - 1 else acc.no_sync(model)


def check_finite(value: torch.Tensor, what: str, step: int, output_dir: Path) -> None:
    if not torch.isfinite(value).all():
        last = checkpoint.latest(output_dir)
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"step {step}: {what} is {value.item() if value.numel() == 1 else 'not finite'}; training stopped ({kept})"
        )
