"""Our reward-model trainer against TRL's RewardTrainer on the same model, pairs, batch size, max length
and steps: steps/s and peak memory ratios (ours/TRL).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rm_vs_trl.py [--steps 4] [--warmup 1] [--rounds 2] [--batch-size 4]
        [--max-length 128] [--lora] [--trl-gradient-checkpointing] [--threads 1]

The model is the embedded SmolLM2-135M-Instruct with a one-output sequence-classification head, in
fp32 on both sides (TRL 1.16 would pick bf16 even on CPU). The pairs are HH-RLHF harmless pairs
(../shared/data/hh-rlhf/harmless-base-test.dev.jsonl) as TRL's conversational prompt/chosen/rejected,
one pair per prompt (our batch counts prompts, TRL's counts pairs: with one pair each they agree), and
both sequences of every pair between 3/4 of max_length and max_length tokens: neither trainer drops a
pair (both leave out pairs longer than max_length), and every batch is nearly the same size on both
sides whatever order each draws the pairs in. Each run trains warmup + steps steps (one epoch of exactly
those pairs) in its own process; steps/s counts the timed steps only (model load, tokenisation and
warm-up excluded); peak memory is the process's peak RSS at its last step (on a GPU, torch's peak allocated
memory). Runs alternate between the sides, one torch thread each by default (see _common.run_sides);
the ratios are of medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common

HERE = Path(__file__).resolve()


def select_pairs(count: int, max_length: int) -> list:
    from cai.core import models
    from cai.train import runtime

    tokenizer = runtime.load_tokenizer(models.resolve("smollm2", []))
    picked, groups = [], set()
    for pair in _common.hh_pairs():
        _, with_chosen, with_rejected = _common.token_lengths(tokenizer, pair)
        if (
            pair.group not in groups
            and 3 * max_length // 4 <= min(with_chosen, with_rejected)
            and max(with_chosen, with_rejected) <= max_length
        ):
            groups.add(pair.group)
            picked.append(pair)
            if len(picked) == count:
                return picked
    sys.exit(
        f"only {len(picked)} HH pairs of one prompt each fit between 3/4 max_length and max_length {max_length}; {count} needed"
    )


def run_ours(args, clock: _common.StepClock, folder: Path) -> None:
    from cai.train import reward

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
    }
    if args.lora:
        doc["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    _common.time_ours(clock)
    reward.train(_common.our_config("rm", doc, folder))


def run_trl(args, clock: _common.StepClock, folder: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai.core import models
    from cai.train import data, runtime

    path = models.resolve("smollm2", [])
    tokenizer = runtime.load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=data.pad_id(tokenizer), dtype=torch.float32
    )
    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    config = RewardConfig(**_common.trl_common_args(args, folder / "out"), max_length=args.max_length)
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_common.trl_lora(args, "SEQ_CLS"),
        callbacks=[_common.trl_callback(clock)],
    )
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_side_arguments(parser, lr=1e-5)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    if args.side is not None:
        _common.run_child(args, run_ours, run_trl)
        return

    pairs = select_pairs(args.batch_size * (args.warmup + args.steps), args.max_length)
    print(
        f"SmolLM2 reward model fp32, {'LoRA r=16' if args.lora else 'full fine-tune'}, batch {args.batch_size} pairs of "
        f"{3 * args.max_length // 4}-{args.max_length} tokens, {args.warmup} warm-up + {args.steps} timed steps, "
        f"TRL gradient checkpointing {'on' if args.trl_gradient_checkpointing else 'off'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_file = _common.write_pairs(pairs, Path(tmp) / "pairs.jsonl")
        results = _common.run_sides(HERE, sys.argv[1:], data_file, args)
    print(json.dumps(_common.report_ratios(results)))


if __name__ == "__main__":
    main()
