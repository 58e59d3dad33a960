"""Errors a user can act on: each renders as one line naming the file and the field."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input. Renders as `FILE: field.path: what is wrong` (or `FILE:LINE: ...`)."""

    def __init__(self, file: str, field: str | None, message: str, line: int | None = None):
        self.file = str(file)
        self.field = field
        self.message = message
        self.line = line
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = " ".join(self.message.split())  # one line, whatever the source message held
        return f"{where}: {self.field}: {text}" if self.field else f"{where}: {text}"


def field_path(parts) -> str:
    """Render a jsonschema-style path (keys and indexes) as `a.b[2].c`; `<root>` when empty."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"
