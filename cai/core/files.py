"""Reading user files safely: every way a file can be unreadable becomes one InputError."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from cai.core.errors import InputError, field_path


def _open_bytes(p: Path):
    """The file opened for reading bytes, or an InputError saying why it cannot be."""
    if not p.exists():
        raise InputError(str(p), None, "file not found")
    if p.is_dir():
        raise InputError(str(p), None, "is a directory, expected a file")
    try:
        return open(p, "rb")
    except OSError as exc:
        raise InputError(str(p), None, f"cannot read: {exc.strerror or exc}") from None


def _decode(data: bytes, p: Path, line: int | None = None) -> str:
    if b"\x00" in data:
        raise InputError(str(p), None, "binary file, expected UTF-8 text", line=line)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(str(p), None, f"not UTF-8 text (byte {exc.start})", line=line) from None


def _json_line(line: str, path: str | Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(str(path), None, f"invalid JSON: {exc.msg} (column {exc.colno})", line=lineno) from None


def read_text(path: str | Path) -> str:
    """The file's text, or an InputError saying why it cannot be read as UTF-8 text."""
    p = Path(path)
    with _open_bytes(p) as f:
        try:
            data = f.read()
        except OSError as exc:
            raise InputError(str(p), None, f"cannot read: {exc.strerror or exc}") from None
    return _decode(data, p)


def jsonl_records(path: str | Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a user's JSONL file."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, _json_line(line, path, lineno)


def jsonl_file_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line, read as the file is consumed: a file of
    millions of lines starts at once and never sits in memory whole. Errors as read_text's, per line."""
    p = Path(path)
    with _open_bytes(p) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, p, lineno)
            if line.strip():
                yield lineno, _json_line(line, p, lineno)


def count_nonblank_lines(path: str | Path) -> int:
    """Lines with something on them (a JSONL file's records), counted without parsing them."""
    with open(path, "rb") as f:
        return sum(1 for line in f if not line.isspace())


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


# JSON Schema counts 2.0 as an integer; a count or a seed given as 2.0 is a typo to report, not to
# carry into range() or an engine.
_STRICT_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
)
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_STRICT_TYPES)


@cache
def _schemas() -> Registry:
    """Every packaged schema by its file name, so one schema can use another's definitions
    (`"$ref": "pipeline.json#/$defs/backend"`) instead of copying them."""
    files = [f for f in resources.files("cai.schemas").iterdir() if f.name.endswith(".json")]
    return Registry().with_resources(
        (f.name, Resource.from_contents(schema(f.name[: -len(".json")]), default_specification=DRAFT202012))
        for f in files
    )


def validate(data: Any, schema_name: str, file: str, line: int | None = None) -> None:
    """Validate against a packaged JSON Schema; the most specific error becomes an InputError."""
    _check_text(data, [], file, line)
    errors = list(_Validator(schema(schema_name), registry=_schemas()).iter_errors(data))
    if not errors:
        return
    error = _most_specific(errors)
    raise InputError(file, field_path(error.absolute_path), _describe(error), line=line)


def _check_text(data: Any, path: list, file: str, line: int | None) -> None:
    """Escapes such as \\ud800 parse into strings that are not Unicode text; nothing downstream can hash
    or write them, so they are reported here with their field."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                file, field_path(path), "not valid Unicode text (a lone surrogate escape)", line=line
            ) from None
    elif isinstance(data, dict):
        for key, value in data.items():
            _check_text(key, path, file, line)
            _check_text(value, [*path, key], file, line)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _check_text(value, [*path, index], file, line)


def _only_type_alternatives(error: jsonschema.ValidationError) -> bool:
    return error.validator in ("oneOf", "anyOf") and all(
        c.validator == "type" and not c.relative_path for c in error.context
    )


def _most_specific(errors: list[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    # Errors inside if/then or oneOf branches carry the deepest path: the deepest is the one a user can
    # fix. At equal depth a wrong type comes first, since every other complaint there follows from it.
    flat = []
    for error in errors:
        stack = [error]
        while stack:
            e = stack.pop()
            if e.context and not _only_type_alternatives(e):
                # Of a oneOf's branches, those whose type fits the value say what is wrong with it.
                fitting = [c for c in e.context if not (c.validator == "type" and c.absolute_path == e.absolute_path)]
                stack.extend(fitting or e.context)
            else:
                flat.append(e)
    return max(flat, key=lambda e: (len(e.absolute_path), e.validator == "type" or _only_type_alternatives(e)))


PATTERN_MEANING = {
    r"\S": "must not be blank",
    r"^https?://\S+$": "must be an http:// or https:// URL",
    r"^[A-Za-z_][A-Za-z0-9_]*$": "must be the name of an environment variable",
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$": "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'",
}


def _describe(error: jsonschema.ValidationError) -> str:
    v, value = error.validator, error.instance
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted((set(value) - set(allowed)), key=str) if isinstance(value, dict) else []
        return (
            f"unknown key {extra[0]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
            if extra
            else error.message
        )
    if v == "required":
        return error.message.replace(" is a required property", " is required")
    if v == "type" or _only_type_alternatives(error):
        alternatives = [error] if v == "type" else error.context
        expected = [
            t
            for e in alternatives
            for t in (e.validator_value if isinstance(e.validator_value, list) else [e.validator_value])
        ]
        names = {"object": "mapping", "array": "list"}
        return f"expected {' or '.join(names.get(t, t) for t in expected)}, got {type_name(value)}"
    if v == "minItems" and error.validator_value == 1:
        return "must not be empty"
    if v == "pattern":
        return PATTERN_MEANING.get(error.validator_value, f"must match {error.validator_value}") + (
            f", got {value!r}" if value.strip() else ""
        )
    if v == "exclusiveMinimum":
        return f"must be greater than {error.validator_value}, got {value}"
    if v == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}, got {value!r}"
    return error.message


TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    dict: "mapping",
    type(None): "null",
}  # in the words of YAML and JSON Schema, not Python's


def type_name(value: Any) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the form every content hash in cai is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def resolve_path(value: str, named_in: Path) -> Path:
    """A path a user file names: relative to that file's folder, else to the current folder (the project root)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for base in (named_in.parent, Path.cwd()):
        if (base / p).exists():
            return base / p
    return named_in.parent / p


def existing_path(value: str, named_in: Path, shown: str, field: str, folder_ok: bool = False) -> Path:
    """A path a user file names (resolved by `resolve_path`) that must exist: a file, or with `folder_ok`
    a file or a folder. `shown` and `field` name the user's file and field in the error."""
    p = resolve_path(value, named_in)
    if not p.exists():
        raise InputError(shown, field, f"{'file or folder' if folder_ok else 'file'} not found: {value}")
    if p.is_dir() and not folder_ok:
        raise InputError(shown, field, f"is a directory, expected a file: {value}")
    return p
