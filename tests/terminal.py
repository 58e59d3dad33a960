"""Running `cai` in a pseudo-terminal, as a person would see it."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENGINE_LINE = re.compile(
    r"(^|\n)\s*(\(EngineCore[^)]*\)|INFO|WARNING|\[W\d|\[\w+\] )|FutureWarning|UserWarning|DeprecationWarning"
)


def run_in_terminal(*argv: str) -> tuple[int, str]:
    """Run `cai` with a pseudo-terminal as its stdout and stderr; its exit code and everything it showed."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cai.cli", *argv], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return process.wait(timeout=600), ANSI.sub("", shown.decode("utf-8", "replace"))
