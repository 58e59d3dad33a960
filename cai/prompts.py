"""Prompt sets: JSONL files, one prompt (a string or a conversation) a line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cai.errors import InputError
from cai.files import content_hash, jsonl_records, read_text, validate

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: the hash of the conversation, so the same prompt gets the same id in every run
    source_id: str | None  # the id the prompt file gave, kept for tracing
    messages: tuple[Message, ...]
    source: str


def load(path: str | Path) -> list[Prompt]:
    file = str(path)
    text = read_text(path)
    prompts: list[Prompt] = []
    seen_ids: dict[str, int] = {}
    seen_rows: dict[str, int] = {}
    for lineno, obj in jsonl_records(file, text):
        if isinstance(obj, dict) and "prompt" in obj and "messages" in obj:
            raise InputError(file, None, "give either 'prompt' or 'messages', not both", line=lineno)
        if isinstance(obj, dict) and "prompt" not in obj and "messages" not in obj:
            raise InputError(file, None, "needs a 'prompt' string or a 'messages' list", line=lineno)
        validate(obj, "prompt", file, line=lineno)
        messages = tuple(obj["messages"]) if "messages" in obj else ({"role": "user", "content": obj["prompt"]},)
        if messages[-1]["role"] != "user":
            raise InputError(file, f"messages[{len(messages) - 1}].role", "the last message must be from the user", line=lineno)
        source_id = None if obj.get("id") is None else str(obj["id"])
        if source_id is not None:
            if source_id in seen_ids:
                raise InputError(file, "id", f"duplicate id {source_id!r} (first on line {seen_ids[source_id]})", line=lineno)
            seen_ids[source_id] = lineno
        row_id = content_hash({"messages": messages})
        if row_id in seen_rows:
            raise InputError(file, None, f"duplicate prompt (same as line {seen_rows[row_id]})", line=lineno)
        seen_rows[row_id] = lineno
        prompts.append(Prompt(id=row_id, source_id=source_id, messages=messages, source=file))
    if not prompts:
        raise InputError(file, None, "file is empty" if not text.strip() else "no prompts in file")
    return prompts


def load_many(paths: list[Path]) -> list[Prompt]:
    """Prompts of several files in order; the same prompt in two files is an error, not a silent duplicate."""
    out: list[Prompt] = []
    first_source: dict[str, str] = {}
    for path in paths:
        for prompt in load(path):
            if prompt.id in first_source:
                raise InputError(str(path), None, f"prompt {prompt.source_id or prompt.id!r} already appears in {first_source[prompt.id]}")
            first_source[prompt.id] = prompt.source
            out.append(prompt)
    return out
