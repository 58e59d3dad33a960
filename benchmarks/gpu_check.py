"""The trainers on a CUDA GPU, in a few minutes and with nothing to download: sft, dpo, rm and grpo
steps in bf16 with gradient checkpointing, packing and sdpa (and flash attention where flash-attn is
installed), a stopped run that resumes with the uninterrupted losses, and one-process FSDP2 runs of
sft, dpo (its reference offloaded to CPU memory) and grpo through `accelerate launch`, each stopped
after a checkpoint and resumed from its shards; one table of pass/fail, steps/s and peak memory.

    .venv/bin/python benchmarks/gpu_check.py [--steps 6] [--cpu]

The model is the tests' tiny random Llama (tests/tiny_model.py: built in seconds from the repository's
own text, torch and tokenizers only, no vLLM); the data the tests' synthetic records. Without a CUDA
GPU it says so and exits 0; `--cpu` runs the same checks on the CPU in fp32 (FSDP on 2 processes over
gloo), which is how this script itself is tested. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common

sys.path[:0] = [str(_common.ROOT / "tests"), str(_common.ROOT / "tests" / "train")]

FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: {processes}
num_machines: 1
machine_rank: 0
mixed_precision: {precision}
use_cpu: {cpu}
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_reshard_after_forward: true
"""


class Clock:
    """Timestamps of the train lines the trainers log (the end of each optimizer step), from `reset` on."""

    def __init__(self):
        from cai.train.metrics import MetricsLog

        self.stamps: list[float] = []
        log = MetricsLog.log

        def timed(log_self, step, split, values):
            log(log_self, step, split, values)
            if split == "train":
                self.stamps.append(time.perf_counter())

        MetricsLog.log = timed

    def reset(self) -> None:
        self.stamps.clear()

    def steps_per_s(self) -> float | None:
        """Over the steps after the first (its time holds loading and the first kernels' set-up)."""
        timed = self.stamps[1:]
        return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def write_config(folder: Path, name: str, kind: str, data: dict, steps: int, cpu: bool, **doc) -> Path:
    from synthetic import write_config as write

    return write(
        folder / f"{name}.yaml",
        model=str(folder / "tiny"),
        data=data,
        output_dir=str(folder / name),
        max_steps=steps,
        batch_size=4,
        lr=1e-3,
        max_length=128,
        save_every=2,
        seed=1,
        precision="fp32" if cpu else "bf16",
        **doc,
    )


def checks(folder: Path, steps: int, cpu: bool) -> list[tuple[str, callable]]:
    """(name, run) pairs; each run returns the output folder whose metrics it trained."""
    import importlib.util

    from synthetic import PROMPTS, preference_records, read_metrics, sft_records, write_jsonl
    from transformers import AutoTokenizer

    from cai.train import config as train_config
    from cai.train import dpo, grpo, reward, sft

    tokenizer = AutoTokenizer.from_pretrained(folder / "tiny")
    # the rule reward's tokens: single-token strings of the tiny vocabulary, as the tests' target_tokens
    tokens = [t for t in (tokenizer.decode([i]) for i in range(300, 600)) if len(tokenizer.encode(t)) == 1]

    sft_data = write_jsonl(folder / "sft.jsonl", sft_records(64))
    pairs = write_jsonl(folder / "pairs.jsonl", preference_records(64, seed=0))
    memory = {"gradient_checkpointing": True}
    grpo_section = {
        "rewards": [{"name": "share", "rule": "token_fraction", "tokens": tokens}],
        "samples": 4,
        "max_new_tokens": 8,
    }

    def run(trainer, kind, name, data, **doc):
        def go():
            path = write_config(folder, name, kind, data, steps, cpu, **doc)
            trainer.train(train_config.load(kind, path))
            return folder / name

        return go

    def resume():
        data = {"train": str(sft_data), "eval_fraction": 0}
        straight = write_config(folder, "resume-straight", "sft", data, steps, cpu, packing=True, **memory)
        stopped = write_config(folder, "resume-stopped", "sft", data, steps, cpu, packing=True, **memory)
        sft.train(train_config.load("sft", straight))
        sft.train(train_config.load("sft", stopped), stop_after=2)
        sft.train(train_config.load("sft", stopped))
        expected, resumed = read_metrics(folder / "resume-straight"), read_metrics(folder / "resume-stopped")
        for step in expected:
            if abs(expected[step]["loss"] - resumed[step]["loss"]) > 1e-4:
                raise AssertionError(
                    f"step {step}: loss {resumed[step]['loss']} resumed, {expected[step]['loss']} straight"
                )
        return folder / "resume-stopped"

    def fsdp(kind, name, data, **doc):
        """Under FSDP2 through `accelerate launch`: one process on a GPU; on the CPU two over gloo, with
        accelerate's accelerator-only check lifted (tests/train/launch_trainings.py). Stopped after step
        2's checkpoint and resumed from its shards in the same launch."""

        def go():
            path = write_config(folder, name, kind, data, steps, cpu, **doc, **memory)
            accelerate_config = folder / f"{name}-accelerate.yaml"
            processes, precision = (2, "'no'") if cpu else (1, "bf16")
            accelerate_config.write_text(FSDP_CONFIG.format(processes=processes, precision=precision, cpu=cpu))
            (folder / f"{name}-plan.json").write_text(json.dumps([[kind, str(path), 2], [kind, str(path), 0]]))
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
            command += [
                str(_common.ROOT / "tests" / "train" / "launch_trainings.py"),
                str(folder / f"{name}-plan.json"),
            ]
            done = subprocess.run(command + (["--fsdp-on-cpu"] if cpu else []), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:] or done.stdout[-2000:])
            if not (folder / name / "checkpoints" / "step-2" / "state" / "pytorch_model_fsdp_0").is_dir():
                raise AssertionError("no sharded checkpoint at step 2")
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(folder / name / "final")  # a full checkpoint any tool loads
            return folder / name

        return go

    out = [
        ("sft  ckpt+packing sdpa", run(sft, "sft", "sft", {"train": str(sft_data)}, packing=True, **memory)),
        ("dpo  ckpt+packing", run(dpo, "dpo", "dpo", {"train": str(pairs)}, packing=True, **memory)),
        ("rm   ckpt", run(reward, "rm", "rm", {"train": str(pairs)}, **memory)),
        (
            "grpo ckpt, HF rollout",
            run(
                grpo,
                "grpo",
                "grpo",
                {"train": str(PROMPTS)},
                grpo=grpo_section,
                **memory,
            ),
        ),
        ("sft  stop, resume", resume),
    ]
    if importlib.util.find_spec("flash_attn") is not None and not cpu:
        out.insert(
            1,
            (
                "sft  flash_attention_2",
                run(
                    sft,
                    "sft",
                    "sft-flash",
                    {"train": str(sft_data)},
                    packing=True,
                    attn_implementation="flash_attention_2",
                ),
            ),
        )
    out += [
        ("sft  FSDP2, stop, resume", fsdp("sft", "fsdp-sft", {"train": str(sft_data), "eval_fraction": 0})),
        (
            "dpo  FSDP2, ref offload",
            fsdp("dpo", "fsdp-dpo", {"train": str(pairs), "eval_fraction": 0}, reference_offload="cpu"),
        ),
        (
            "grpo FSDP2, stop, resume",
            fsdp(
                "grpo",
                "fsdp-grpo",
                {"train": str(PROMPTS)},
                grpo=grpo_section,
            ),
        ),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--cpu", action="store_true", help="the same checks on the CPU in fp32 (FSDP on 2 processes over gloo)"
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA GPU here: nothing to check (run this on a GPU machine; --cpu checks the script itself)")
        return
    from conftest import corpus
    from tiny_model import build_tiny_model

    rows, failed = [], 0
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_tiny_model(folder / "tiny", corpus())
        device = "cpu" if args.cpu else torch.cuda.get_device_name()
        print(
            f"{device}, {'fp32' if args.cpu else 'bf16'}, tiny Llama, {args.steps} steps a check; FSDP2 on "
            f"{'2 CPU processes over gloo' if args.cpu else '1 process'}",
            flush=True,
        )
        for name, run in checks(folder, args.steps, args.cpu):
            clock.reset()
            peak_reset()
            started = time.perf_counter()
            try:
                run()
                result = "pass"
            except Exception as exc:  # a failed check is a row of the table, not the end of the script
                failed += 1
                result = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                traceback.print_exc()
            rate = clock.steps_per_s()
            peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _common.peak_memory_mib()
            rows.append((name, result, rate, peak, time.perf_counter() - started))
            print(f"  {name:<24} {result}", flush=True)
    print(f"\n{'check':<24} {'result':<8} {'steps/s':>8} {'peak MiB':>9} {'seconds':>8}")
    for name, result, rate, peak, seconds in rows:
        shown = "-" if rate is None else f"{rate:.2f}"
        print(f"{name:<24} {result.split(':')[0]:<8} {shown:>8} {peak:>9.0f} {seconds:>8.1f}")
    print(json.dumps({"failed": failed, "checks": len(rows)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
