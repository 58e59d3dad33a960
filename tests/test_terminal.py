"""What a person sees in a terminal during `cai run`: the live display and the summary, not the
engines' warnings and start-up lines (those go to RUN_DIR/engine.log, back on the terminal with -v)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

from pipeline_files import tiny_pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENGINE_LINE = re.compile(r"(^|\n)\s*(\(EngineCore[^)]*\)|INFO|WARNING|\[W\d|\[\w+\] )|FutureWarning|UserWarning|DeprecationWarning")


def run_in_terminal(*argv: str) -> tuple[int, str]:
    """Run `cai` with a pseudo-terminal as its stdout and stderr; its exit code and everything it showed."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "cai.cli", *argv], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
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


def test_terminal_shows_the_live_display_and_no_engine_output(tiny_model, tmp_path):
    pipeline = tiny_pipeline(tmp_path, tiny_model, rounds=1)
    run_dir = tmp_path / "run"
    code, shown = run_in_terminal("run", str(pipeline), "--limit", "4", "--run-dir", str(run_dir))
    assert code == 0, shown[-3000:]
    assert "ETA" in shown and "critique_revise" in shown  # the live display's columns and stages
    assert "rows done: 4/4" in shown and "report:" in shown
    assert not ENGINE_LINE.search(shown), ENGINE_LINE.search(shown).group(0) + "\n" + shown[-3000:]
    log = (run_dir / "engine.log").read_text()
    assert log.strip()  # the engine's output is kept, in the run's log


def test_verbose_brings_the_engine_output_back(tiny_model, tmp_path):
    pipeline = tiny_pipeline(tmp_path, tiny_model, rounds=1)
    code, shown = run_in_terminal("run", str(pipeline), "--limit", "2", "--run-dir", str(tmp_path / "run"), "--quiet", "-v")
    assert code == 0 and ENGINE_LINE.search(shown), shown[-3000:]
    assert not (tmp_path / "run" / "engine.log").exists()
