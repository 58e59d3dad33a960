"""Reading user files safely: every way a file can be unreadable becomes one InputError."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cai.errors import InputError, field_path


def read_text(path: str | Path) -> str:
    """The file's text, or an InputError saying why it cannot be read as UTF-8 text."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), None, "file not found")
    if p.is_dir():
        raise InputError(str(p), None, "is a directory, expected a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(str(p), None, f"cannot read: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise InputError(str(p), None, "binary file, expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(str(p), None, f"not UTF-8 text (byte {exc.start})") from None


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file; empty files and syntax errors are InputErrors."""
    text = read_text(path)
    if not text.strip():
        raise InputError(str(path), None, "file is empty")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(str(path), None, f"YAML syntax error{where}: {problem}") from None


@cache
def schema(name: str) -> dict:
    return json.loads(resources.files("cai.schemas").joinpath(f"{name}.json").read_text())


def validate(data: Any, schema_name: str, file: str, line: int | None = None) -> None:
    """Validate against a packaged JSON Schema; the most specific error becomes an InputError."""
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    errors = list(validator.iter_errors(data))
    if not errors:
        return
    error = _most_specific(errors)
    raise InputError(file, field_path(error.absolute_path), _describe(error), line=line)


def _most_specific(errors: list[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    # Errors inside if/then or anyOf branches carry the deepest path; the deepest is the one a user can fix.
    flat = []
    for error in errors:
        stack = [error]
        while stack:
            e = stack.pop()
            if e.context:
                stack.extend(e.context)
            else:
                flat.append(e)
    return max(flat, key=lambda e: (len(e.absolute_path), e.validator != "type"))


def _describe(error: jsonschema.ValidationError) -> str:
    v, value = error.validator, error.instance
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        return f"unknown key {extra[0]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "") if extra else error.message
    if v == "required":
        return error.message.replace(" is a required property", " is required")
    if v == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"expected {expected}, got {_type_name(value)}"
    if v == "minItems" and error.validator_value == 1:
        return "must not be empty"
    if v == "pattern" and error.validator_value == r"\S":
        return "must not be blank"
    if v == "exclusiveMinimum":
        return f"must be greater than {error.validator_value}, got {value}"
    if v == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}, got {value!r}"
    return error.message


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the form every content hash in cai is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
