"""Where the engines' and libraries' output goes during a run: into the run's own log file, so the
terminal holds cai's live display and summary only.

The redirection is of file descriptors 1 and 2, not of Python's sys.stdout/sys.stderr objects: vLLM's
engine core is a spawned process that inherits the descriptors, and torch and C extensions write to
them directly. The terminal's stderr stays reachable through a copy of its descriptor."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

_terminal: TextIO | None = None  # while output is redirected: the terminal's stderr


def terminal() -> TextIO:
    """Where cai's own live lines go: the terminal's stderr, also while descriptors 1 and 2 are redirected."""
    return _terminal or sys.stderr


@contextlib.contextmanager
def redirected(path: Path) -> Iterator[TextIO]:
    """Descriptors 1 and 2 append to `path` for the block; yields a stream to the terminal's stderr
    (also what `terminal()` returns meanwhile)."""
    global _terminal
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        _terminal = terminal
        yield terminal
    finally:
        _terminal = None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)
        terminal.close()
