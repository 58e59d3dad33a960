"""What the trainer benchmarks share: the HH-RLHF pairs as TRL's conversational format, step clocks
for both trainers, peak memory, and the runs of each side in its own process, alternated."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.dev.jsonl"
SIDES = ("ours", "trl")


def hh_pairs():
    """The HH pairs as cai.train.data.Pair (prompt messages, then one assistant message each side)."""
    from cai.train import data

    return data.load_preferences(HH)


def write_pairs(pairs, path: Path) -> Path:
    """TRL's conversational prompt/chosen/rejected JSONL, which both trainers read."""
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def token_lengths(tokenizer, pair) -> tuple[int, int, int]:
    """(prompt, prompt + chosen, prompt + rejected) token counts, as both trainers render them."""
    from cai.train import data

    prompt = len(
        tokenizer(data.render(tokenizer, pair.prompt, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    )
    chosen, rejected = (
        len(data.encode(tokenizer, pair.prompt + answer).input_ids) for answer in (pair.chosen, pair.rejected)
    )
    return prompt, chosen, rejected


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch on a GPU; on a CPU this process's resident-set high-water mark
    (VmHWM), since there the weights, gradients, optimizer state and activations all live in RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class StepClock:
    """A timestamp at the end of every optimizer step; the first `warmup` steps are not timed. The peak
    memory is read at the last step, before either trainer writes its final model."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.stamps, self.peak = warmup, steps, [], None

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup + self.steps:
            self.peak = peak_memory_mib()

    def result(self) -> dict[str, float]:
        if len(self.stamps) != self.warmup + self.steps:
            raise RuntimeError(f"{len(self.stamps)} steps ran, {self.warmup + self.steps} expected")
        timed = self.stamps[self.warmup - 1 :] if self.warmup else self.stamps  # from the end of the last warm-up step
        durations = [b - a for a, b in zip(timed, timed[1:])]
        return {"steps_per_s": len(durations) / sum(durations), "step_s": durations, "peak_mib": self.peak}


def time_ours(clock: StepClock) -> None:
    """Tick at each `train` line our trainers log: that is the end of an optimizer step."""
    from cai.train.metrics import MetricsLog

    log = MetricsLog.log

    def timed(self, step, split, values):
        log(self, step, split, values)
        if split == "train":
            clock.tick()

    MetricsLog.log = timed


def trl_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


def trl_common_args(args, output_dir: Path) -> dict:
    """TRL settings both of its trainers get: fp32 (TRL 1.16 turns bf16 on by default, even on CPU), the
    same seed, batch, steps, optimizer and schedule as ours, no logging, saving or evaluation."""
    return {
        "output_dir": str(output_dir),
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.warmup + args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "seed": args.seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def trl_lora(args, task_type: str):
    """TRL's adapter under --lora (r=16 on every linear layer, as ours gets), else None."""
    if not args.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type=task_type)


def our_doc(model: str, data: Path, output_dir: Path, batch_size: int, max_length: int, **more) -> dict:
    """A benchmark's training config: fp32, lr 1e-6 from the first step, no held-out split, no checkpoint."""
    return {
        "model": model,
        "data": {"train": str(data), "eval_fraction": 0},
        "output_dir": str(output_dir),
        "seed": 1234,
        "batch_size": batch_size,
        "lr": 1e-6,
        "warmup_steps": 0,
        "max_length": max_length,
        "precision": "fp32",
        "save_every": 10**6,
        **more,
    }


def our_config(kind: str, doc: dict, folder: Path):
    """A TrainConfig through the same loader and schema as `cai train KIND CONFIG.yaml`."""
    import yaml

    from cai.train import config

    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config.load(kind, path)


def add_side_arguments(parser, lr: float) -> None:
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each side, alternated (ours, TRL, TRL, ours, ...)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers, both sides")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL's own default; off by default here because our trainers have no gradient checkpointing",
    )
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (see run_sides)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set by run_sides for the child processes
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def run_child(args, run_ours, run_trl) -> None:
    """One side's run, in the process run_sides started: prints its clock's result as the last line."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        (run_ours if args.side == "ours" else run_trl)(args, clock, Path(tmp))
    print(json.dumps(clock.result()))


def run_sides(script: Path, argv: list[str], data_file: Path, args) -> dict[str, list[dict]]:
    """Each side in its own process (peak memory is per process), alternating which goes first so both
    see the same share of the other engineers' load on this CPU."""
    # OpenMP threads spin-wait: on a CPU other processes share, more threads than free cores make
    # steps several times slower at random, which no number of rounds averages out.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, str(script), *argv, "--side", side, "--data", str(data_file)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=env,
            )
            if done.returncode != 0:
                sys.exit(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[side].append(result)
            steps = " ".join(f"{s:.1f}" for s in result["step_s"])
            print(
                f"round {round_ + 1} {side:<4} {result['steps_per_s']:.4f} steps/s  (steps: {steps} s)  "
                f"peak memory {result['peak_mib']:.0f} MiB  [{time.perf_counter() - started:.0f} s with load]",
                flush=True,
            )
    return results


def report_ratios(results: dict[str, list[dict]]) -> dict[str, float]:
    """steps/s of each side as 1 / the median of all its timed steps (a step slowed by another process's
    burst moves a median little, a mean a lot); peak memory as the median over its runs; ours/TRL."""
    rate = {side: 1 / statistics.median(s for r in runs for s in r["step_s"]) for side, runs in results.items()}
    peak = {side: statistics.median(r["peak_mib"] for r in runs) for side, runs in results.items()}
    mean_rate = {
        side: sum(len(r["step_s"]) for r in runs) / sum(sum(r["step_s"]) for r in runs)
        for side, runs in results.items()
    }
    speed, memory = rate["ours"] / rate["trl"], peak["ours"] / peak["trl"]
    print(
        f"steps/s (1 / median step): ours {rate['ours']:.4f}, TRL {rate['trl']:.4f}  ->  ratio ours/TRL {speed:.2f}"
        f"  (from total time over total steps: {mean_rate['ours'] / mean_rate['trl']:.2f})"
    )
    print(
        f"peak memory (median of runs): ours {peak['ours']:.0f} MiB, TRL {peak['trl']:.0f} MiB  ->  ratio ours/TRL {memory:.2f}"
    )
    return {
        "steps_per_s_ratio": speed,
        "peak_memory_ratio": memory,
        "steps_per_s_ratio_from_means": mean_rate["ours"] / mean_rate["trl"],
        "ours_steps_per_s": rate["ours"],
        "trl_steps_per_s": rate["trl"],
        "ours_peak_mib": peak["ours"],
        "trl_peak_mib": peak["trl"],
    }
