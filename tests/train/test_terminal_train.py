"""What a person sees in a terminal during `cai train`: the step line and the summary; the libraries'
output goes to OUTPUT/train.log."""

from __future__ import annotations

import asyncio

from synthetic import preference_records, write_config, write_jsonl
from terminal import ENGINE_LINE, run_in_terminal


def test_a_training_shows_its_step_line_and_keeps_library_output_in_its_log(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(16))
    config = write_config(
        tmp_path / "rm.yaml",
        model=str(tiny_model),
        data={"train": str(data), "eval_fraction": 0.0},
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        batch_size=4,
        lr=1e-3,
        max_length=64,
    )
    code, shown = run_in_terminal("train", "rm", str(config))
    assert code == 0, shown[-3000:]
    assert "rm step 4/4, loss " in shown and "accuracy" in shown and "s/step, ETA 0:00" in shown
    assert f"model: {tmp_path / 'out' / 'final'}" in shown
    assert not ENGINE_LINE.search(shown), shown[-3000:]
    # transformers reports the new reward head it initialised: in the log, not on the terminal
    assert "score.weight" in (tmp_path / "out" / "train.log").read_text()
    code, shown = run_in_terminal("train", "rm", str(config), "-v", "--set", f"output_dir={tmp_path / 'verbose'}")
    assert code == 0 and "score.weight" in shown and not (tmp_path / "verbose" / "train.log").exists()


def test_a_training_with_bad_input_leaves_no_output_folder(tiny_model, tmp_path):
    data = write_jsonl(
        tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}]
    )  # no answer
    config = write_config(
        tmp_path / "sft.yaml",
        model=str(tiny_model),
        data={"train": str(data)},
        output_dir=str(tmp_path / "out"),
        max_steps=2,
    )
    code, shown = run_in_terminal("train", "sft", str(config))
    assert code == 2 and str(data) in shown, shown[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_phase_without_steps_shows_its_progress(monkeypatch):
    """Sampling K answers per prompt (rejection sampling, ReST, HIR) shows how many prompts are done;
    piped, a plain line every few seconds and the last one."""
    import io

    from cai.core import logs
    from cai.generate.backends.base import _gather
    from cai.train import metrics

    stream = io.StringIO()
    monkeypatch.setattr(logs, "terminal", lambda: stream)
    line = metrics.PhaseLine("rejection round 1: prompts sampled", 3)

    async def answer(value):
        return value

    assert asyncio.run(_gather((answer(v) for v in "abc"), line.show)) == ["a", "b", "c"]
    line.close()
    assert stream.getvalue().splitlines() == ["rejection round 1: prompts sampled: 3/3, 0 s, ETA 0:00"]
