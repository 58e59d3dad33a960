"""What a job may use besides its workspace's files. Jobs come from token holders; the server's
environment (its API keys) and its Python process are the operator's. So:
- an API backend must be one the operator declares (`cai serve --backends FILE`): the same URLs with
  the same key variable, within its models and limits. A job's pipeline names them as `cai run` would
  (so one file runs in both places); it cannot send a key, or any request, anywhere else;
- engine options pass an allow-list of sizes, precision and scheduling. vLLM's others include options
  that run code (trust_remote_code, worker_cls, logits_processors, plugins), unpickle weights
  (load_format), or read and fetch files (tokenizer, download_dir, hf_token)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import InputError
from cai.core.files import TYPE_NAMES, load_yaml, type_name, validate
from cai.generate.backends.base import BackendSpec
from cai.generate.backends.openai_api import base_urls

LIMITS = ("max_concurrency", "requests_per_minute", "tokens_per_minute")


@dataclass(frozen=True)
class ServerBackend:
    """An API server jobs may use, as the operator's backends file (cai/schemas/server_backends.json) declares it."""

    name: str
    base_urls: tuple[str, ...]
    api_key_env: str | None = None
    models: tuple[str, ...] = ()  # empty: any model the server serves
    max_concurrency: int | None = None  # a job must set its own at most this
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def describe(self) -> str:
        return f"{self.name}: {', '.join(self.base_urls)} with " + (
            f"${self.api_key_env}" if self.api_key_env else "no key"
        )


def load_backends(path: str | Path) -> dict[str, ServerBackend]:
    name = str(path)
    doc = load_yaml(path)
    validate(doc, "server_backends", name)
    out = {}
    for key, spec in doc["backends"].items():
        variable = spec.get("api_key_env")
        if variable and not os.environ.get(variable):
            raise InputError(name, f"backends.{key}.api_key_env", f"{variable} is not set in the server's environment")
        limits = {k: spec[k] for k in LIMITS if k in spec}
        out[key] = ServerBackend(
            key, tuple(_same_url(u) for u in base_urls(spec)), variable, tuple(spec.get("models", ())), **limits
        )
    return out


def _same_url(url: str) -> str:
    return url.rstrip("/")  # `.../v1/` and `.../v1` are one server


# backends that reach a server by URL with a key: a job may name only those the operator declared
API_BACKENDS = ("openai", "openai_batch")


def check_api_backend(
    spec: BackendSpec,
    allowed: Mapping[str, ServerBackend],
    shown: str,
    where: str | None = None,
    model_field: str | None = None,
) -> None:
    """An InputError unless the operator declared this backend's URLs with this key variable (or with none).
    `where`: the field errors name (default: the pipeline's `backends.NAME`); `model_field`: the model's
    (default `where.model`; an eval's model entry may name its own)."""
    where = where or f"backends.{spec.name}"
    urls = {_same_url(u) for u in base_urls(spec.settings)}
    variable = spec.settings.get("api_key_env")
    match = next((b for b in allowed.values() if b.api_key_env == variable and urls <= set(b.base_urls)), None)
    if match is None:
        offered = (
            "; ".join(b.describe() for b in allowed.values())
            or "none; the operator declares them with cai serve --backends FILE"
        )
        key = f"${variable}" if variable else "no key"
        raise InputError(
            shown,
            where,
            f"{', '.join(sorted(urls))} with {key} is not a backend this server allows (allowed: {offered})",
        )
    if match.models and spec.model not in match.models:
        raise InputError(
            shown,
            model_field or f"{where}.model",
            f"{spec.model!r} is not a model the server's backend {match.name!r} allows ({', '.join(match.models)})",
        )
    for limit in LIMITS:
        cap, value = getattr(match, limit), spec.settings.get(limit)
        if cap is not None and (value is None or value > cap):
            raise InputError(
                shown,
                f"{where}.{limit}",
                f"the server's backend {match.name!r} allows at most {cap}: set it to {cap} or less",
            )


# What each option may be: a type, a tuple of the values allowed, or a table for a nested mapping.
ENGINE_OPTIONS: dict[str, Any] = {
    **dict.fromkeys(
        (
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_logprobs",
            "seed",
            "kv_cache_memory_bytes",
        ),
        int,
    ),
    **dict.fromkeys(("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"), int),
    **dict.fromkeys(("gpu_memory_utilization", "cpu_offload_gb"), float),
    **dict.fromkeys(("enforce_eager", "enable_prefix_caching", "enable_chunked_prefill"), bool),
    "dtype": ("auto", "half", "float16", "bfloat16", "float", "float32"),
    "kv_cache_dtype": ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "trust_remote_code": (False,),
    "load_format": ("safetensors",),
    "structured_outputs_config": {
        "backend": ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"),
        "disable_any_whitespace": bool,
        "disable_additional_properties": bool,
    },
}
_WHY_ONE_VALUE = {
    "trust_remote_code": "true runs Python code that comes with the model",
    "load_format": "other formats unpickle weights, which can run code",
}
_ACCEPTS = {int: (int,), float: (int, float), bool: (bool,)}  # exact types: True is an int to Python, not a count


def check_engine_options(
    options: Mapping[str, Any], shown: str, where: str, table: Mapping[str, Any] = ENGINE_OPTIONS
) -> None:
    """An InputError for the first option outside the allow-list, `where` being its mapping's field path."""
    for key, value in options.items():
        field = f"{where}.{key}"
        if key not in table:
            raise InputError(
                shown, field, f"not an engine option jobs may set on this server (allowed: {', '.join(sorted(table))})"
            )
        rule = table[key]
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise InputError(shown, field, "expected a mapping")
            check_engine_options(value, shown, field, rule)
        elif isinstance(rule, tuple):
            if not any(type(value) is type(v) and value == v for v in rule):  # True == 1, but 1 is not a boolean
                why = f": {_WHY_ONE_VALUE[key]}" if key in _WHY_ONE_VALUE else ""
                raise InputError(shown, field, f"may only be {' or '.join(map(json.dumps, rule))} on this server{why}")
        elif type(value) not in _ACCEPTS[rule]:
            raise InputError(shown, field, f"expected {TYPE_NAMES[rule]}, got {type_name(value)}")


def job_keys(backends: Iterable[BackendSpec]) -> list[str]:
    """The key variables a checked job's API backends read: the only secrets its job is given."""
    return sorted({spec.settings["api_key_env"] for spec in backends if spec.settings.get("api_key_env")})
