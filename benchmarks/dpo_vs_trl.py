"""Our DPO trainer against TRL's DPOTrainer on the same model, pairs, batch size, max length and steps:
steps/s and peak memory ratios (ours/TRL), and our dpo_loss against TRL's on identical log-probs.

    .venv/bin/python benchmarks/dpo_vs_trl.py [--steps 4] [--warmup 1] [--rounds 2] [--batch-size 2]
        [--max-length 128] [--lora] [--precompute-ref] [--trl-gradient-checkpointing] [--threads 1]

The model is the embedded SmolLM2-135M-Instruct, in fp32 on both sides (TRL 1.16 would pick bf16 even
on CPU). The pairs are HH-RLHF harmless pairs (../shared/data/hh-rlhf/harmless-base-test.dev.jsonl)
as TRL's conversational prompt/chosen/rejected, chosen so that every chosen and rejected sequence is
cut at max_length with answer tokens left: every batch is then the same [2 x batch, max_length] on
both sides, whatever order each trainer draws the pairs in, and the ratio measures the trainers, not
the draw. Each run trains warmup + steps steps (one epoch of exactly those pairs) in its own process;
steps/s counts the timed steps only (model load, tokenisation and warm-up excluded); peak memory is
the process's peak RSS at its last step (on a GPU, torch's peak allocated memory). Runs alternate
between the sides, one torch thread each by default (see _common.run_sides); the ratios are of medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common

HERE = Path(__file__).resolve()


def select_pairs(count: int, max_length: int, min_answer: int) -> list:
    """The first `count` HH pairs whose prompt leaves at least `min_answer` answer tokens and whose
    answers both run past max_length."""
    from cai.core import models
    from cai.train import runtime

    tokenizer = runtime.load_tokenizer(models.resolve("smollm2", []))
    picked = []
    for pair in _common.hh_pairs():
        prompt, with_chosen, with_rejected = _common.token_lengths(tokenizer, pair)
        if prompt <= max_length - min_answer and min(with_chosen, with_rejected) >= max_length:
            picked.append(pair)
            if len(picked) == count:
                return picked
    sys.exit(f"only {len(picked)} HH pairs run past max_length {max_length}; {count} needed")


def loss_difference(dtype) -> float:
    """Max |ours - TRL| over loss types and betas on random log-probs down to -200, TRL's loss called as
    tests/train/test_losses.py calls it (TRL 1.16 has no standalone DPO loss function)."""
    import torch

    sys.path.insert(0, str(_common.ROOT / "tests" / "train"))
    from test_losses import trl_dpo_loss

    from cai.train.losses import dpo_loss

    g = torch.Generator().manual_seed(0)
    logps = [-(torch.rand(64, generator=g, dtype=dtype) * 200) for _ in range(4)]
    probs = torch.linspace(0.55, 1.0, 64, dtype=dtype)
    worst = 0.0
    for beta in (0.05, 0.1, 0.5):
        for loss_type in ("sigmoid", "ipo", "hinge"):
            ours = dpo_loss(*logps, beta=beta, loss_type=loss_type)[0].mean()
            worst = max(worst, abs(ours.item() - trl_dpo_loss(*logps, beta=beta, loss_type=loss_type).item()))
        # conservative DPO per pair is TRL's `aot` with label_smoothing = 1 - p on a batch of one
        ours = dpo_loss(*logps, beta=beta, label_prob=probs)[0]
        for i in range(0, 64, 8):
            theirs = trl_dpo_loss(
                *(x[i : i + 1] for x in logps), beta=beta, loss_type="aot", label_smoothing=1 - probs[i].item()
            )
            worst = max(worst, abs(ours[i].item() - theirs.item()))
    return worst


def run_ours(args, clock: _common.StepClock, folder: Path) -> None:
    from cai.train import dpo

    doc = {
        "model": "smollm2",
        "data": {"train": str(args.data), "eval_fraction": 0},
        "output_dir": str(folder / "out"),
        "seed": args.seed,
        "max_steps": args.warmup + args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 0,
        "scheduler": "cosine",
        "max_length": args.max_length,
        "precision": "fp32",
        "save_every": 10**6,
        "dpo": {"beta": args.beta, "loss_type": "sigmoid", "precompute_ref": args.precompute_ref},
    }
    if args.lora:
        doc["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    _common.time_ours(clock)
    dpo.train(_common.our_config("dpo", doc, folder))


def run_trl(args, clock: _common.StepClock, folder: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from cai.core import models
    from cai.train import runtime

    path = models.resolve("smollm2", [])
    tokenizer = runtime.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    config = DPOConfig(
        **_common.trl_common_args(args, folder / "out"),
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=args.precompute_ref,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_common.trl_lora(args, "CAUSAL_LM"),
        callbacks=[_common.trl_callback(clock)],
    )
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_side_arguments(parser, lr=1e-6)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--precompute-ref", action="store_true", help="reference log-probs computed before training, both sides"
    )
    args = parser.parse_args()

    if args.side is not None:
        _common.run_child(args, run_ours, run_trl)
        return

    import torch

    print(
        f"dpo_loss vs TRL's on identical log-probs (sigmoid, ipo, hinge, cDPO): max abs difference "
        f"{loss_difference(torch.float64):.1e} in float64, {loss_difference(torch.float32):.1e} in float32",
        flush=True,
    )
    pairs = select_pairs(args.batch_size * (args.warmup + args.steps), args.max_length, min_answer=16)
    print(
        f"SmolLM2 fp32, {'LoRA r=16' if args.lora else 'full fine-tune'}, batch {args.batch_size} pairs x max_length "
        f"{args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, reference "
        f"{'precomputed' if args.precompute_ref else 'in the loop'}, TRL gradient checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}, {args.threads} thread(s) per run",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_file = _common.write_pairs(pairs, Path(tmp) / "pairs.jsonl")
        results = _common.run_sides(HERE, sys.argv[1:], data_file, args)
    print(json.dumps(_common.report_ratios(results)))


if __name__ == "__main__":
    main()
