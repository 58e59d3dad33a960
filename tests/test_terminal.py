"""What a person sees in a terminal during `cai run`: the live display and the summary, not the
engines' warnings and start-up lines (those go to RUN_DIR/engine.log, back on the terminal with -v)."""

from __future__ import annotations

from pipeline_files import tiny_pipeline
from terminal import ENGINE_LINE, run_in_terminal


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
    code, shown = run_in_terminal(
        "run", str(pipeline), "--limit", "2", "--run-dir", str(tmp_path / "run"), "--quiet", "-v"
    )
    assert code == 0 and ENGINE_LINE.search(shown), shown[-3000:]
    assert not (tmp_path / "run" / "engine.log").exists()
