"""Held-out pairwise accuracy of a SmolLM2 reward model trained on HH-RLHF harmless pairs, against the
same model with its reward head untrained, on the same held-out pairs.

    .venv/bin/python benchmarks/rm_accuracy.py [--train-lines 300] [--holdout 200] [--max-length 256]
        [--batch-size 4] [--epochs 1] [--lr 2e-5] [--lora] [--keep DIR] [--threads 1]

Training reads the first --train-lines lines of ../shared/data/hh-rlhf/harmless-base-test.dev.jsonl
(`cai train rm` drops pairs longer than max_length); evaluation scores the last --holdout lines, less
any whose prompt also occurs in training, in full (no truncation), as `cai eval-rm MODEL PAIRS.jsonl`
does: accuracy with its 95% Wilson interval, ties counting half. The untrained model is SmolLM2 with
the head the training run starts from (the same seed draws the same initial head). --keep DIR keeps
both models and the held-out pairs there, for `cai eval-rm`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-lines", type=int, default=300)
    parser.add_argument("--holdout", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers (the head trains in full)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--keep", type=Path, help="folder to keep the models and held-out pairs in")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads: more than the free cores slows a shared CPU down"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification

    from cai.core import models
    from cai.train import data, reward, runtime

    pairs = _common.hh_pairs()
    if args.train_lines + args.holdout > len(pairs):
        raise SystemExit(f"{args.train_lines} + {args.holdout} lines asked, {len(pairs)} in {_common.HH}")
    train = pairs[: args.train_lines]
    seen = {p.group for p in train}
    held = [p for p in pairs[-args.holdout :] if p.group not in seen]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        held_file = _common.write_pairs(held, folder / "heldout.jsonl")
        doc = {
            "model": "smollm2",
            "data": {"train": str(_common.write_pairs(train, folder / "train.jsonl")), "eval_fraction": 0},
            "output_dir": str(folder / "rm"),
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": 5,
            "max_length": args.max_length,
            "precision": "fp32",
            "save_every": 10**6,
            "keep_checkpoints": 1,
        }
        if args.lora:
            doc["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
        started = time.perf_counter()
        trained = reward.train(_common.our_config("rm", doc, folder))
        train_s = time.perf_counter() - started
        steps = [
            s
            for s in map(json.loads, (folder / "rm" / "metrics.jsonl").read_text().splitlines())
            if s["split"] == "train"
        ]
        last = steps[-10:]
        print(
            f"trained {len(steps)} steps of {args.batch_size} prompts in {train_s / 60:.1f} min with loading and centring "
            f"(max_length {args.max_length}, {'LoRA r=16' if args.lora else 'full fine-tune'}, lr {args.lr}); "
            f"last 10 steps: loss {sum(s['loss'] for s in last) / len(last):.3f}, batch accuracy {sum(s['accuracy'] for s in last) / len(last):.2f}"
        )

        path = models.resolve("smollm2", [])
        set_seed(args.seed)  # as the trainer does right before it loads the model: the same initial head
        untrained = folder / "untrained"
        tokenizer = runtime.load_tokenizer(path)
        AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=data.pad_id(tokenizer), dtype=torch.float32
        ).save_pretrained(untrained)
        tokenizer.save_pretrained(untrained)

        # in length order: the scorer pads each batch to its longest answer, and the order changes no score
        held_pairs = sorted(
            data.load_preferences(held_file),
            key=lambda p: sum(len(m["content"]) for m in p.prompt + p.chosen + p.rejected),
        )
        results = {}
        for name, model in (("trained", trained), ("untrained", untrained)):
            started = time.perf_counter()
            results[name] = reward.evaluate_pairs(reward.RewardScorer({"rm": (model, 1.0)}), held_pairs)
            low, high = results[name]["accuracy_ci95"]
            print(
                f"{name:<9} accuracy {results[name]['accuracy']:.3f}  95% CI [{low:.3f}, {high:.3f}]  mean margin "
                f"{results[name]['mean_margin']:+.3f}  on {results[name]['n']} held-out pairs  [{time.perf_counter() - started:.0f} s]",
                flush=True,
            )
        if args.keep:
            print(f"again: cai eval-rm {trained} {held_file} ; cai eval-rm {untrained} {held_file}")
    print(
        json.dumps(
            {name: {k: r[k] for k in ("n", "accuracy", "accuracy_ci95", "mean_margin")} for name, r in results.items()}
        )
    )


if __name__ == "__main__":
    main()
