"""Chains on the tiny model: SL-CAI data -> SFT -> RL-CAI labels from the SFT model -> RM -> DPO -> an
eval of the base model against the DPO policy, each step the same command a user types, resumed and
skipped on reruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from pipeline_files import tiny_eval, tiny_pipeline

from cai.cli import main

TRAIN = {"seed": 3, "max_steps": 2, "batch_size": 2, "max_length": 256, "save_every": 1, "lr": 1.0e-4}


def write(path, doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def chain_file(tmp_path, tiny_model):
    (tmp_path / "sl").mkdir()
    (tmp_path / "rl").mkdir()
    sl = tiny_pipeline(tmp_path / "sl", tiny_model, rounds=1)
    rl = tiny_pipeline(
        tmp_path / "rl",
        tiny_model,
        roles={"responder": "local", "judge": "local"},
        stages=[
            {"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0},
            {"type": "compare", "tie_threshold": 0.0},
        ],
    )
    rated = tiny_eval(tmp_path, tiny_model, bootstrap=10, generation={"max_tokens": 4})
    # Each config names its data and model as a user would; the chain replaces them with its steps' outputs.
    configs = {
        kind: write(
            tmp_path / f"{kind}.yaml",
            {
                "model": str(tiny_model),
                "data": {"train": str(sl), "eval_fraction": 0.0},
                "output_dir": "unused",
                **TRAIN,
            },
        )
        for kind in ("sft", "rm", "dpo")
    }
    return write(
        tmp_path / "chain.yaml",
        {
            "name": "tiny_chain",
            "workdir": str(tmp_path / "work"),
            "steps": [
                {"name": "sl", "run": str(sl), "limit": 4},
                {
                    "name": "sft",
                    "train": "sft",
                    "config": str(configs["sft"]),
                    "set": ["data.train=${sl}/datasets/sft.jsonl"],
                },
                {"name": "rl", "run": str(rl), "limit": 4, "set": ["backends.local.model=${sft}/final"]},
                {
                    "name": "rm",
                    "train": "rm",
                    "config": str(configs["rm"]),
                    "set": ["model=${sft}/final", "data.train=${rl}/datasets/preferences.jsonl"],
                },
                {
                    "name": "dpo",
                    "train": "dpo",
                    "config": str(configs["dpo"]),
                    "set": ["model=${sft}/final", "data.train=${rl}/datasets/preferences.jsonl"],
                },
                {
                    "name": "eval",
                    "eval": str(rated),
                    "limit": 2,
                    "set": ["models.terse.model=${dpo}/final", "models.verbose.model=${dpo}/final"],
                },
            ],
        },
    )


def test_quiet_and_verbose_reach_the_steps_that_take_them(chain_file):
    from cai import chain

    seen = []

    def run_command(argv):
        seen.append(argv)
        return 0 if len(seen) < 2 else 1  # the second step fails: the chain stops before any report

    assert chain.run(chain.load(chain_file), run_command, quiet=True, verbose=True) == 1
    assert seen[0][0] == "run" and seen[0][-2:] == ["--quiet", "--verbose"]
    assert seen[1][0] == "train" and seen[1][-1] == "--verbose" and "--quiet" not in seen[1]  # train has no --quiet


def test_an_eval_step_is_the_cai_eval_command(chain_file, tmp_path):
    from cai import chain

    step = chain.load(chain_file).steps[-1]
    work = tmp_path / "work"
    assert step.argv == (
        "eval",
        str(tmp_path / "eval.yaml"),
        "--run-dir",
        str(work / "eval"),
        "--limit",
        "2",
        "--set",
        f"models.terse.model={work / 'dpo'}/final",
        "--set",
        f"models.verbose.model={work / 'dpo'}/final",
    )
    seen = []
    chain.run(chain.Chain(chain_file, "one", work, (step,)), lambda argv: seen.append(argv) or 1, quiet=True)
    assert seen[0][-1] == "--quiet"  # cai eval, like cai run, takes it


def test_chain_runs_every_step_on_earlier_outputs_then_skips_them(chain_file, tmp_path, capsys):
    assert main(["run", str(chain_file), "--quiet"]) == 0
    work = tmp_path / "work"
    state = json.loads((work / "chain.json").read_text())
    assert list(state["steps"]) == ["sl", "sft", "rl", "rm", "dpo", "eval"]
    rl_manifest = json.loads((work / "rl" / "manifest.json").read_text())
    assert rl_manifest["config"]["backends"]["local"]["model"] == str(
        work / "sft" / "final"
    )  # answers came from the SFT model
    assert (work / "rl" / "report.html").exists() and (work / "sl" / "datasets" / "sft.jsonl").exists()
    for step in ("sft", "rm", "dpo"):
        assert (work / step / "final" / "model.safetensors").exists() and (work / step / "metrics.jsonl").exists()
    ratings = json.loads((work / "eval" / "ratings.json").read_text())
    assert ratings["models"]["terse"]["model"] == str(work / "dpo" / "final")  # the policy the chain trained
    assert ratings["axes"]["harmless"]["models"]["terse"]["n_comparisons"] == 2 * 2  # 2 prompts, 2 opponents
    capsys.readouterr()

    assert main(["run", str(chain_file), "--quiet"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 6

    assert main(["report", str(work)]) == 0
    page = (work / "report.html").read_text()
    assert all(f"<h2>{step}</h2>" in page for step in ("sl", "sft", "rl", "rm", "dpo", "eval"))
    assert 'href="rl/report.html"' in page and 'src="dpo/curves.png"' in page and "last logged" in page
    assert 'href="eval/report.html"' in page and 'src="eval/report/frontier.png"' in page and "harmless Elo" in page

    doc = yaml.safe_load(chain_file.read_text())
    doc["steps"][3]["set"].append("lr=0.001")
    write(chain_file, doc)
    assert main(["run", str(chain_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"{chain_file}: steps[3]: changed since it ran: delete {work / 'rm'}, {work / 'dpo'}, {work / 'eval'} to run it and the steps after it again"
    )


@pytest.mark.parametrize(
    "edit, field, says",
    [
        (lambda d: d["steps"][1]["set"].append("model=${rl}/final"), "steps[1].set", "${rl} names no earlier step"),
        (lambda d: d["steps"].append(dict(d["steps"][0])), "steps[6].name", "a second step named 'sl'"),
        (lambda d: d["steps"][0].update(run="missing.yaml"), "steps[0].run", "file not found: missing.yaml"),
        (lambda d: d["steps"][1].pop("config"), "steps[1]", None),
    ],
    ids=["later-step-reference", "duplicate-name", "missing-pipeline", "train-without-config"],
)
def test_bad_chain_is_one_line_before_any_step_runs(chain_file, tmp_path, capsys, edit, field, says):
    doc = yaml.safe_load(chain_file.read_text())
    edit(doc)
    write(chain_file, doc)
    assert main(["run", str(chain_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{chain_file}: {field}: ") and "\n" not in err
    if says:
        assert err.endswith(says)
    assert not (tmp_path / "work").exists()


# -- chains that repeat


def rounds_chain(tmp_path, tiny_model, times: int = 2, after: list | None = None) -> object:
    """RL-CAI labels from the latest policy -> DPO on them, `times` rounds: round 1 answers with the tiny
    model itself, each later round with the previous round's DPO policy."""
    (tmp_path / "rl").mkdir(exist_ok=True)
    rl = tiny_pipeline(
        tmp_path / "rl",
        tiny_model,
        roles={"responder": "local", "judge": "local"},
        stages=[
            {"type": "respond", "samples": 2, "max_tokens": 8, "temperature": 1.0},
            {"type": "compare", "tie_threshold": 0.0},
        ],
    )
    dpo = write(
        tmp_path / "dpo.yaml",
        {"model": str(tiny_model), "data": {"train": str(rl), "eval_fraction": 0.0}, "output_dir": "unused", **TRAIN},
    )
    round_steps = [
        {"name": "rl", "run": str(rl), "limit": 2, "set": ["backends.local.model=${prev.dpo}/final"]},
        {
            "name": "dpo",
            "train": "dpo",
            "config": str(dpo),
            "set": ["model=${prev.dpo}/final", "data.train=${rl}/datasets/preferences.jsonl", "seed=${round}"],
        },
    ]
    return write(
        tmp_path / "rounds.yaml",
        {
            "name": "rounds",
            "workdir": str(tmp_path / "work"),
            "steps": [{"name": "iterate", "repeat": {"times": times, "steps": round_steps}}, *(after or [])],
        },
    )


def test_a_repeat_block_runs_its_steps_each_round_on_the_previous_rounds_outputs(tmp_path, tiny_model):
    from cai import chain

    after = [{"name": "last", "run": str(tmp_path / "rl" / "tiny.yaml"), "set": ["backends.local.model=${dpo}/final"]}]
    loaded = chain.load(rounds_chain(tmp_path, tiny_model, times=3, after=after))
    work = tmp_path / "work"
    assert [s.name for s in loaded.steps] == [f"round-{r}/{n}" for r in (1, 2, 3) for n in ("rl", "dpo")] + ["last"]
    sets = {s.name: [a for k, a in enumerate(s.argv) if k and s.argv[k - 1] == "--set"] for s in loaded.steps}
    # round 1 has no previous round: the lines naming it are left out, the files' own models stand
    assert sets["round-1/rl"] == []
    assert sets["round-1/dpo"] == [
        f"data.train={work}/round-1/rl/datasets/preferences.jsonl",
        "seed=1",
        f"output_dir={work}/round-1/dpo",
    ]
    assert sets["round-3/rl"] == [f"backends.local.model={work}/round-2/dpo/final"]
    assert sets["round-3/dpo"][:2] == [
        f"model={work}/round-2/dpo/final",
        f"data.train={work}/round-3/rl/datasets/preferences.jsonl",
    ]
    assert ["--run-dir", str(work / "round-2" / "rl")] == list(loaded.steps[2].argv[2:4])
    assert sets["last"] == [f"backends.local.model={work}/round-3/dpo/final"]  # after the block: its last round's


@pytest.mark.parametrize(
    "edit, field, says",
    [
        (
            lambda d: d["steps"].append({"name": "x", "run": "rl/tiny.yaml", "set": ["a=${prev.dpo}"]}),
            "steps[1].set",
            "${prev.dpo} is known only inside a repeat block",
        ),
        (
            lambda d: d["steps"].append({"name": "x", "run": "rl/tiny.yaml", "set": ["seed=${round}"]}),
            "steps[1].set",
            "${round} is known only inside a repeat block",
        ),
        (
            lambda d: d["steps"][0]["repeat"]["steps"][0]["set"].append("a=${prev.sft}"),
            "steps[0].repeat.steps[0].set",
            "${prev.sft} names no step of this repeat block",
        ),
        (
            lambda d: d["steps"][0]["repeat"]["steps"].append({"name": "iterate", "run": "rl/tiny.yaml"}),
            "steps[0].repeat.steps[2].name",
            "a second step named 'iterate'",
        ),
        (
            lambda d: d["steps"][0]["repeat"]["steps"].append(
                {"name": "inner", "repeat": {"times": 2, "steps": [{"name": "y", "run": "rl/tiny.yaml"}]}}
            ),
            "steps[0].repeat.steps[2]",
            "a repeat block inside another is not supported",
        ),
        (lambda d: d["steps"][0]["repeat"].update(times=0), "steps[0].repeat.times", None),
    ],
    ids=["prev-outside", "round-outside", "prev-unknown", "duplicate-name", "nested", "zero-times"],
)
def test_bad_repeat_blocks_are_one_line_before_any_step_runs(tmp_path, tiny_model, capsys, edit, field, says):
    path = rounds_chain(tmp_path, tiny_model)
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    write(path, doc)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: {field}: ") and "\n" not in err, err
    if says:
        assert err.endswith(says)
    assert not (tmp_path / "work").exists()


def test_two_rounds_resume_inside_round_two_after_a_kill(tmp_path, tiny_model):
    path = rounds_chain(tmp_path, tiny_model)
    work = tmp_path / "work"

    def start():
        command = [sys.executable, "-m", "cai.cli", "run", str(path), "--quiet"]
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    proc = start()
    deadline = time.monotonic() + 600
    while not (work / "round-2" / "rl" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert list(json.loads((work / "chain.json").read_text())["steps"]) == ["round-1/rl", "round-1/dpo"]

    proc = start()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("done earlier, skipped") == 2  # round 1 is not redone
    state = json.loads((work / "chain.json").read_text())
    assert list(state["steps"]) == ["round-1/rl", "round-1/dpo", "round-2/rl", "round-2/dpo"]
    manifest = json.loads((work / "round-2" / "rl" / "manifest.json").read_text())
    assert manifest["config"]["backends"]["local"]["model"] == str(work / "round-1" / "dpo" / "final")
    assert (work / "round-2" / "dpo" / "final" / "model.safetensors").exists()
