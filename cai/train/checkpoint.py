"""The output folder of a training run: the recorded config, checkpoints, the final model.

OUTPUT/
  config.json                 the config the run was started with; a rerun must match it
  checkpoints/step-N/         model + tokenizer (safetensors, save_pretrained), trainer_state.json
                              (step, data position), state/ (optimizer, scheduler, RNG of every process)
  final/                      model + tokenizer (LoRA merged in)

Under FSDP a checkpoint's weights are the shards each process wrote (state/pytorch_model_fsdp_N, in
parallel): gathering a large model whole at every checkpoint would take one process's memory and much
of the time. Only final/ is gathered whole.

Every folder is written under a temporary name and renamed into place: a kill leaves the previous
checkpoints whole. Optimizer, scheduler and RNG state go through accelerate's save_state, which knows
how FSDP and DeepSpeed shard them; the weights are not saved twice (save_pretrained holds them)
except where those engines insist.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cai.core.disk import replaced_folder, write_atomic
from cai.core.errors import InputError
from cai.core.files import canonical_json
from cai.train.config import TrainConfig, changed_keys


def record_config(config: TrainConfig) -> None:
    """Write OUTPUT/config.json, or refuse (InputError, before anything is written) a config that
    differs from the one the folder's run started with: resuming it would mix two runs."""
    path = config.output_dir / "config.json"
    current = {"kind": config.kind, "config": config.raw}
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded.get("kind") != config.kind:
            raise InputError(
                str(config.file),
                None,
                f"{config.output_dir} holds a `cai train {recorded.get('kind')}` run: use another output_dir",
            )
        changed = changed_keys(recorded["config"], config.raw)
        if changed:
            key = changed[0]
            raise InputError(
                str(config.file),
                key,
                f"differs from the run in {config.output_dir} (recorded: {canonical_json(recorded['config'].get(key))}): "
                "resuming needs the same config; use another output_dir for a new run",
            )
    write_atomic(path, json.dumps(current, indent=2) + "\n")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def skip_model_weights(accelerator) -> None:
    """save_pretrained writes the weights; accelerate's save_state need not write them again, and
    load_state need not read them (the model is built from the checkpoint). FSDP and DeepSpeed save
    their shards outside these hooks."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save(
    accelerator,
    model,
    tokenizer,
    output_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    others: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`. `others` are further
    trained models (PPO's value model), each saved the same way in a subfolder of its name."""
    folder = output_dir / "checkpoints" / f"step-{step}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    for folder_of, trained in [(tmp, model), *((tmp / name, other) for name, other in (others or {}).items())]:
        unwrapped = accelerator.unwrap_model(trained)
        if sharded(accelerator) and not hasattr(unwrapped, "peft_config"):
            if accelerator.is_main_process:
                unwrapped.config.save_pretrained(folder_of)
            continue  # the weights are in state/'s shards; a LoRA adapter is small enough to keep whole
        unwrapped.save_pretrained(
            folder_of,
            state_dict=accelerator.get_state_dict(trained),
            is_main_process=accelerator.is_main_process,
            safe_serialization=True,
        )
    accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.rename(tmp, folder)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def sharded(accelerator) -> bool:
    """Whether each process holds only a slice of every weight (FSDP, from `accelerate launch
    --config_file`): whole weights are then gathered to save them or hand them to vLLM."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(folder: Path) -> bool:
    """Whether a checkpoint's weights are FSDP shards (state/pytorch_model_fsdp_0) rather than safetensors."""
    return (folder / "state" / "pytorch_model_fsdp_0").is_dir()


def gathered_state_dict(module) -> dict[str, Any]:
    """An FSDP module's weights whole, gathered onto the main process's CPU (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(accelerator, folder: Path) -> dict[str, Any]:
    """Optimizer, scheduler and RNG state from a checkpoint (the model was built from it); returns its
    trainer state (step, data position, ...)."""
    accelerator.load_state(str(folder / "state"))
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))


def save_final(accelerator, model, tokenizer, output_dir: Path) -> Path:
    """OUTPUT/final: a plain model any loader reads (a LoRA adapter is merged into its base)."""
    folder = output_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "merge_and_unload"):
        unwrapped = unwrapped.merge_and_unload()
    # under FSDP every process takes part in gathering the weights; else save_pretrained reads them
    state_dict = gathered_state_dict(unwrapped) if sharded(accelerator) else None
    if accelerator.is_main_process:
        with replaced_folder(folder) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return folder
