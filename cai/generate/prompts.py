"""Prompt sets: JSONL files, one prompt (a string or a conversation) a line, read lazily."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cai.core.errors import InputError
from cai.core.files import content_hash, jsonl_file_records, validate
from cai.generate.records import Message


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: the hash of the conversation, so the same prompt gets the same id in every run
    source_id: str | None  # the id the prompt file gave, kept for tracing
    messages: tuple[Message, ...]
    source: str


def iter_file(path: str | Path) -> Iterator[Prompt]:
    """The prompts of one file, validated line by line as they are read."""
    file = str(path)
    seen_ids: dict[str, int] = {}
    seen_rows: dict[str, int] = {}
    any_line = False
    for lineno, obj in jsonl_file_records(path):
        any_line = True
        if isinstance(obj, dict) and "prompt" in obj and "messages" in obj:
            raise InputError(file, None, "give either 'prompt' or 'messages', not both", line=lineno)
        if isinstance(obj, dict) and "prompt" not in obj and "messages" not in obj:
            raise InputError(file, None, "needs a 'prompt' string or a 'messages' list", line=lineno)
        validate(obj, "prompt", file, line=lineno)
        messages = tuple(obj["messages"]) if "messages" in obj else ({"role": "user", "content": obj["prompt"]},)
        if messages[-1]["role"] != "user":
            raise InputError(
                file, f"messages[{len(messages) - 1}].role", "the last message must be from the user", line=lineno
            )
        source_id = None if obj.get("id") is None else str(obj["id"])
        if source_id is not None:
            if source_id in seen_ids:
                raise InputError(
                    file, "id", f"duplicate id {source_id!r} (first on line {seen_ids[source_id]})", line=lineno
                )
            seen_ids[source_id] = lineno
        row_id = content_hash({"messages": messages})
        if row_id in seen_rows:
            raise InputError(file, None, f"duplicate prompt (same as line {seen_rows[row_id]})", line=lineno)
        seen_rows[row_id] = lineno
        yield Prompt(id=row_id, source_id=source_id, messages=messages, source=file)
    if not seen_rows:
        raise InputError(file, None, "no prompts in file" if any_line else "file is empty")


def iter_many(paths: Iterable[Path]) -> Iterator[Prompt]:
    """Prompts of several files in order; the same prompt in two files is an error, not a silent duplicate."""
    first_source: dict[str, str] = {}
    for path in paths:
        for prompt in iter_file(path):
            if prompt.id in first_source:
                raise InputError(
                    str(path),
                    None,
                    f"prompt {prompt.source_id or prompt.id!r} already appears in {first_source[prompt.id]}",
                )
            first_source[prompt.id] = prompt.source
            yield prompt


def load(path: str | Path) -> list[Prompt]:
    return list(iter_file(path))
