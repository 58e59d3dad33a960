"""`--set key.path=value` overrides, applied to a user file's parsed document before it is validated,
the same way for pipelines, chains and training configs."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from cai.core.errors import InputError


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`stages.1.rounds=2` or `stages[1].rounds=2` -> (["stages", 1, "rounds"], 2); values are YAML."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    parts: list[str | int] = []
    for piece in key.replace("[", ".").replace("]", "").split("."):
        if not piece:
            raise ValueError(f"--set {text!r}: empty part in key path")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        return parts, yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return parts, value


def apply_overrides(doc: Any, overrides: list[str], file: str) -> Any:
    doc = copy.deepcopy(doc)
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            raise InputError(file, None, str(exc)) from None
        target = doc
        for depth, part in enumerate(path[:-1]):
            where = ".".join(map(str, path[: depth + 1]))
            if isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            elif isinstance(target, dict) and isinstance(part, str):
                target = target.setdefault(part, {})
            else:
                raise InputError(file, where, f"--set {text!r}: no such place to set")
        last = path[-1]
        if isinstance(target, list) and isinstance(last, int) and last < len(target):
            target[last] = value
        elif isinstance(target, dict) and isinstance(last, str):
            target[last] = value
        else:
            raise InputError(file, ".".join(map(str, path)), f"--set {text!r}: no such place to set")
    return doc
