"""Two CPU processes over gloo, under DDP (`accelerate launch --multi_gpu`) and under FSDP2
(launch_trainings.py lifts accelerate's accelerator-only check for FSDP): each process trains on its own
shard of the data; a run stopped after a checkpoint resumes where it stopped, on both processes (under
FSDP from its shards); sft, dpo, LoRA sft, rm and grpo (rewarded by that rm) give the same losses and
final weights under both (FSDP's grpo with its reference offloaded to CPU memory); and the whole weights the vLLM sync would load on every process equal the
saved model's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import PROMPTS, preference_records, read_metrics, sft_records, write_config, write_jsonl

LAUNCHER = Path(__file__).with_name("launch_trainings.py")
DDP = "distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\nuse_cpu: true\n"
FSDP = """distributed_type: FSDP
num_processes: 2
num_machines: 1
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
"""
STOPPED = ("sft", "dpo")  # stopped right after step 2's checkpoint, then resumed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folder: Path, accelerate_config: str, plan: list, *flags: str) -> None:
    config = folder / "accelerate.yaml"
    config.write_text(accelerate_config)
    (folder / "plan.json").write_text(json.dumps(plan))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--main_process_port", str(free_port()), str(LAUNCHER), str(folder / "plan.json"), *flags]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-4000:]


def configs(folder: Path, tiny_model: Path, tokens: list[str], fsdp: bool) -> dict[str, tuple[str, Path]]:
    """name -> (kind, config file) of the runs made under each launch, each in its own output folder;
    under FSDP grpo's reference is also offloaded to CPU memory (the same numbers)."""
    sft = write_jsonl(folder / "sft.jsonl", sft_records(32))
    pairs = write_jsonl(folder / "pairs.jsonl", preference_records(32))
    common = {"model": str(tiny_model), "max_steps": 4, "batch_size": 2, "lr": 1e-3, "max_length": 96, "seed": 3}
    common["save_every"] = 2
    docs = {
        "sft": ("sft", {"data": {"train": str(sft), "eval_fraction": 0.0}}),
        "dpo": ("dpo", {"data": {"train": str(pairs), "eval_fraction": 0.0}}),
        "lora": ("sft", {"data": {"train": str(sft), "eval_fraction": 0.0}, "lora": {"r": 4, "alpha": 8}}),
        "rm": ("rm", {"data": {"train": str(pairs), "eval_fraction": 0.0}}),
        # rewarded by the rule and by the reward model trained just before (each process loads it whole)
        "grpo": (
            "grpo",
            {
                "data": {"train": str(PROMPTS)},
                "grpo": {
                    "rewards": [
                        {"name": "share", "rule": "token_fraction", "tokens": tokens},
                        {"name": "rm", "model": str(folder / "rm" / "final"), "weight": 0.5},
                    ],
                    "samples": 4,
                    "max_new_tokens": 6,
                    "kl_beta": 0.01,
                },
                **({"reference_offload": "cpu"} if fsdp else {}),
            },
        ),
    }
    return {
        name: (kind, write_config(folder / f"{name}.yaml", output_dir=str(folder / name), **common, **doc))
        for name, (kind, doc) in docs.items()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, target_tokens) -> dict[str, Path]:
    """The folders of the DDP runs (stopped ones resumed by a second launch, as after a kill) and of the
    FSDP runs (stopped and resumed within one launch)."""
    folders = {"ddp": tmp_path_factory.mktemp("ddp"), "fsdp": tmp_path_factory.mktemp("fsdp")}
    plans = {}
    for mode, folder in folders.items():
        made = configs(folder, tiny_model, target_tokens, fsdp=mode == "fsdp")
        plans[mode] = [[kind, str(path), 2 if name in STOPPED else 0] for name, (kind, path) in made.items()]
        plans[mode + "-resume"] = [[kind, str(path), 0] for name, (kind, path) in made.items() if name in STOPPED]
    launch(folders["ddp"], DDP, plans["ddp"])
    launch(folders["ddp"], DDP, plans["ddp-resume"])
    launch(folders["fsdp"], FSDP, plans["fsdp"] + plans["fsdp-resume"], "--fsdp-on-cpu")
    return folders


def reads(output: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (output / f"reads.rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", STOPPED)
def test_each_process_reads_its_own_shard_and_resumes_where_it_stopped(runs, mode, name):
    output = runs[mode] / name
    first, second = reads(output, 0), reads(output, 1)
    # each process read steps 1-2, then the resumed run read steps 3-4: no batch again, none skipped
    assert [r["position"] for r in first] == [r["position"] for r in second] == [0, 1, 2, 3]
    for mine, theirs in zip(first, second):
        assert mine["indexes"] and not set(mine["indexes"]) & set(theirs["indexes"])  # disjoint shards
    assert len({i for r in first + second for i in r["indexes"]}) == 4 * 2 * 2
    assert sorted(read_metrics(output)) == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["sft", "dpo", "lora", "rm", "grpo"])
def test_fsdp_trains_as_ddp_does_and_checkpoints_shards(runs, tiny_model, name):
    sharded, plain = runs["fsdp"] / name, runs["ddp"] / name
    step_2 = sharded / "checkpoints" / "step-2"
    assert (step_2 / "state" / "pytorch_model_fsdp_0").is_dir()  # each process wrote its shard
    if name != "lora":  # a LoRA adapter is small: it is kept whole beside the shards
        assert not (step_2 / "model.safetensors").exists()
    ours, theirs = read_metrics(sharded), read_metrics(plain)
    assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4]
    for step in theirs:
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5), step
    whole = load_file(sharded / "final" / "model.safetensors")  # gathered whole, LoRA merged in
    reference = load_file(plain / "final" / "model.safetensors")
    start = load_file(tiny_model / "model.safetensors")
    assert whole.keys() == reference.keys()
    for key in reference:
        # the same training up to float rounding (summed in another order), which Adam's first steps
        # can scale up to a fraction of the learning rate in a lone weight whose gradient is near zero
        # (grpo: one o_proj entry off by 2% of the largest move): next to how far the weights moved, a
        # difference that is not rounding would show in the largest entry and across the tensor alike
        moved = (reference[key] - start[key]).abs() if key in start else reference[key].abs()
        off = (whole[key] - reference[key]).abs()
        assert off.max() <= 0.05 * moved.max() + 1e-6, key
        assert off.mean() <= 1e-3 * moved.mean() + 1e-7, key


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_every_process_gathers_the_whole_weights_the_vllm_sync_loads(runs, name):
    saved = load_file(runs["fsdp"] / name / "final" / "model.safetensors")
    for rank in (0, 1):
        gathered = load_file(runs["fsdp"] / name / f"gathered.rank{rank}.safetensors")
        assert gathered.keys() == saved.keys()
        for key, value in gathered.items():
            torch.testing.assert_close(value, saved[key], atol=0, rtol=0, msg=key)


def test_a_sharded_checkpoint_is_not_resumed_without_fsdp(runs, fresh_accelerate_state):
    from cai.core.errors import InputError
    from cai.train import config as train_config
    from cai.train import sft

    config = train_config.load("sft", runs["fsdp"] / "sft.yaml")
    with pytest.raises(InputError, match="holds FSDP shards and this run is launched without FSDP"):
        sft.train(config)


@pytest.mark.parametrize(
    ("kind", "fsdp2", "message"),
    [("ppo", True, "does not run under FSDP yet"), ("sft", False, "fsdp_version: .*set it to 2")],
)
def test_fsdp_refuses_trainers_it_cannot_run_and_fsdp1(tmp_path, tiny_model, kind, fsdp2, message):
    from dataclasses import replace
    from types import SimpleNamespace

    from cai.core.errors import InputError
    from cai.train import config as train_config
    from cai.train import runtime

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    path = write_config(tmp_path / "c.yaml", model=str(tiny_model), data={"train": str(data)}, output_dir="out")
    config = replace(train_config.load("sft", path), kind=kind)
    with pytest.raises(InputError, match=message):
        runtime.check_sharding(config, SimpleNamespace(is_fsdp2=fsdp2))


def test_a_deepspeed_launch_is_refused_naming_the_field(tmp_path, tiny_model, monkeypatch):
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED; cai refuses it as bad
    input (one line, exit 2) instead of accelerate's import traceback (no DeepSpeed build runs here)."""
    from cai.core.errors import InputError
    from cai.train import config as train_config
    from cai.train import runtime

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    path = write_config(tmp_path / "c.yaml", model=str(tiny_model), data={"train": str(data)}, output_dir="out")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(InputError, match="DeepSpeed") as error:
        runtime.accelerator(train_config.load("sft", path))
    assert error.value.field == "distributed_type"
