"""Preference-model pretraining (PMP, Askell et al. 2021) and data efficiency: held-out accuracy of
reward models fine-tuned on n target pairs, with and without `rm.pretrain` on other comparisons first.

    python benchmarks/rm_pmp.py [--sizes 16 64] [--pretrain 128] [--eval 120] [--max-length 128]
        [--epochs 2] [--batch-size 4] [--lr 2e-5] [--threads 2]

The pairs are HH-RLHF harmless pairs (../shared/data/hh-rlhf/harmless-base-test.dev.jsonl, the only
comparison set on this machine) whose both sequences fit max_length, one pair per prompt, split by
prompt into three disjoint sets: the pretraining set, the target pool (each size trains on its first n
pairs) and the held-out pairs. The pretraining set is thus from the same distribution as the target
pairs, where the paper pretrains on other sources (StackExchange, Reddit, Wikipedia): the gain
measured here is what a phase on other comparisons adds, not transfer across sources.

Every model is the embedded SmolLM2-135M-Instruct with a fresh scalar head, trained through the same
`cai train rm` code (fp32, full fine-tune, the same seed). The pretraining phase runs once, inside the
first size's PMP run; the other sizes' runs find it finished (their OUTPUT/pretrain links to it), as
a rerun would. Accuracy is on the held-out pairs, ties half, with its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common


def split(args) -> tuple[list, list, list]:
    from cai.core import models
    from cai.train import runtime

    tokenizer = runtime.load_tokenizer(models.resolve("smollm2", []))
    picked, groups = [], set()
    for pair in _common.hh_pairs():
        _, with_chosen, with_rejected = _common.token_lengths(tokenizer, pair)
        if pair.group not in groups and max(with_chosen, with_rejected) <= args.max_length:
            groups.add(pair.group)
            picked.append(pair)
    need = args.pretrain + max(args.sizes) + args.eval
    if len(picked) < need:
        sys.exit(f"only {len(picked)} HH pairs of one prompt each fit in max_length {args.max_length}; {need} needed")
    held_out = picked[: args.eval]
    pretrain = picked[args.eval : args.eval + args.pretrain]
    pool = picked[args.eval + args.pretrain :]
    return pretrain, pool, held_out


def train_rm(args, folder: Path, name: str, train: Path, eval_file: Path, pretrain: Path | None) -> dict:
    """One `cai train rm` run; its eval lines (step 0: the starting model, last: the trained one)."""
    from cai.train import reward

    doc = {
        "model": "smollm2",
        "data": {"train": str(train), "eval": str(eval_file)},
        "output_dir": str(folder / name),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 2,
        "max_length": args.max_length,
        "precision": "fp32",
        "save_every": 10**6,
        "eval_batch_size": 8,
    }
    if pretrain is not None:
        doc["rm"] = {"pretrain": {"data": str(pretrain), "epochs": args.epochs}}
    reward.train(_common.our_config("rm", doc, folder))
    evals = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    return {"start": evals[0]["accuracy"], "end": evals[-1]["accuracy"], "steps": evals[-1]["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="target pairs each fine-tuning sees")
    parser.add_argument("--pretrain", type=int, default=128, help="pairs in the pretraining set")
    parser.add_argument("--eval", type=int, default=120, help="held-out pairs")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    import torch

    from cai.judge.eval_judge import wilson_interval

    torch.set_num_threads(args.threads)
    pretrain, pool, held_out = split(args)
    print(
        f"SmolLM2 reward models, fp32 full fine-tune, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, max_length "
        f"{args.max_length}; HH pairs: {len(pretrain)} pretraining, sizes {args.sizes} from a pool of {len(pool)}, {len(held_out)} held out",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pretrain_file = _common.write_pairs(pretrain, folder / "pretrain.jsonl")
        eval_file = _common.write_pairs(held_out, folder / "held_out.jsonl")
        first_pmp = None
        for n in sorted(args.sizes):
            train_file = _common.write_pairs(pool[:n], folder / f"train-{n}.jsonl")
            base = train_rm(args, folder, f"base-{n}", train_file, eval_file, None)
            if first_pmp is not None:
                (folder / f"pmp-{n}").mkdir()
                (folder / f"pmp-{n}" / "pretrain").symlink_to(folder / first_pmp / "pretrain")
            pmp = train_rm(args, folder, f"pmp-{n}", train_file, eval_file, pretrain_file)
            first_pmp = first_pmp or f"pmp-{n}"
            rows.append(
                {
                    "n": n,
                    "base": base["end"],
                    "pmp": pmp["end"],
                    "pretrained_only": pmp["start"],
                    "added": pmp["end"] - base["end"],
                }
            )
            print(
                f"n={n:<4} no pretraining {base['end']:.3f}  with PMP {pmp['end']:.3f} (pretrained alone {pmp['start']:.3f})  "
                f"added {pmp['end'] - base['end']:+.3f}",
                flush=True,
            )
    k = len(held_out)
    for row in rows:
        row["base_ci95"] = wilson_interval(row["base"] * k, k)
        row["pmp_ci95"] = wilson_interval(row["pmp"] * k, k)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
