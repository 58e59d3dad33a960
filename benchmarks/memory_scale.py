"""Peak memory and tokens/s of a full fine-tune at about 0.5B parameters: our SFT and DPO with and
without gradient checkpointing and packing, against TRL's SFTTrainer and DPOTrainer with their own
gradient checkpointing (and, for SFT, their padding-free best-fit packing; TRL 1.16's DPOTrainer has
padding_free switched off since its refactor), on the same model, examples, batch size and max length.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_scale.py [--kinds sft,dpo] [--examples 16]
        [--batch-size 4] [--min-length 512] [--max-length 1024] [--threads 2] [--variants ours-ckpt-pack,trl-ckpt-pack,...]
        [--hidden 1280 --layers 24 --intermediate 3456 --heads 20]

The model is a Llama built from a config with random weights (0.54B parameters by default, SmolLM2's
tokenizer and vocabulary; nothing is downloaded), fp32 weights and AdamW on both sides. The data are the
first `--examples` HH-RLHF harmless records (../shared/data/hh-rlhf) whose conversations, prompt and
answer, take --min-length to --max-length tokens with either answer (26 of the 1,000 at 512-1024): for
SFT each prompt with its chosen answer, for DPO the pairs. Every run
(one process each, `--threads` torch threads) trains one epoch over exactly those examples, so both
sides do the same work however they batch it; tokens/s is the examples' tokens (prompt and answers,
counted once per sequence as a tokenizer renders them) over the time from the start of training to the
end of its last step; peak memory is the process's peak RSS when training ends (on a GPU, torch's
peak allocated memory), which here holds the weights, gradients, optimizer state and activations.
TRL's SFT trains the last answer (prompt-completion records: its assistant-only loss refuses
SmolLM2's chat template), ours every assistant turn: as many forward and backward passes, more
trained tokens on our side. The table ends with ours/TRL for each side's configuration that took the
least memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve()
VARIANTS = {
    "sft": ("ours-plain", "ours-ckpt", "ours-ckpt-pack", "trl-plain", "trl-ckpt", "trl-ckpt-pack"),
    "dpo": ("ours-plain", "ours-ckpt", "ours-ckpt-pack", "trl-plain", "trl-ckpt"),
}


def build_model(args, folder: Path) -> Path:
    """A randomly initialised Llama of the given shape with SmolLM2's tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.max_length),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(args, folder: Path) -> tuple[Path, Path, dict[str, int]]:
    """The SFT conversations and the DPO pairs (TRL's formats, which ours read too) and each kind's
    tokens: what one epoch over them trains on."""
    tokenizer = smollm2_tokenizer()
    pairs = [
        p
        for p in _common.hh_pairs()
        if all(args.min_length <= n <= args.max_length for n in _common.token_lengths(tokenizer, p)[1:])
    ][: args.examples]
    if len(pairs) < args.examples:
        sys.exit(f"only {len(pairs)} HH records have both answers within {args.min_length}-{args.max_length} tokens")
    sft_file, dpo_file = folder / "sft.jsonl", _common.write_pairs(pairs, folder / "pairs.jsonl")
    with sft_file.open("w", encoding="utf-8") as f, trl_sft_file(sft_file).open("w", encoding="utf-8") as trl:
        for p in pairs:
            f.write(json.dumps({"messages": p.prompt + p.chosen}) + "\n")
            trl.write(json.dumps({"prompt": p.prompt, "completion": p.chosen}) + "\n")
    tokens = {"sft": 0, "dpo": 0}
    for p in pairs:
        prompt, chosen, rejected = _common.token_lengths(tokenizer, p)
        tokens["sft"] += chosen
        tokens["dpo"] += chosen + rejected
    return sft_file, dpo_file, tokens


def trl_sft_file(sft_file: Path) -> Path:
    """The same conversations as TRL's conversational prompt-completion records: its completion-only
    loss then trains the last answer (its assistant-only loss refuses SmolLM2's chat template)."""
    return sft_file.with_name("sft-trl.jsonl")


def smollm2_tokenizer():
    from cai.core import models
    from cai.train import runtime

    return runtime.load_tokenizer(models.resolve("smollm2", []))


def peak_at(stamps: dict) -> None:
    stamps["end"] = time.perf_counter()
    stamps["peak_mib"] = _common.peak_memory_mib()


def run_ours(args, stamps: dict, folder: Path) -> None:
    from cai.train import checkpoint, dpo, sft
    from cai.train.metrics import MetricsLog

    opened, save_final = MetricsLog.open, checkpoint.save_final

    def started(*a, **k):
        stamps["start"] = time.perf_counter()
        return opened(*a, **k)

    def ended(*a, **k):
        peak_at(stamps)
        return save_final(*a, **k)

    MetricsLog.open, checkpoint.save_final = staticmethod(started), ended
    doc = _common.our_doc(
        str(args.model),
        args.data,
        folder / "out",
        args.batch_size,
        args.max_length,
        epochs=1,
        gradient_checkpointing="ckpt" in args.variant,
        packing="pack" in args.variant,
    )
    if args.kind == "dpo":
        doc["dpo"] = {"beta": 0.1}
    (sft if args.kind == "sft" else dpo).train(_common.our_config(args.kind, doc, folder))


def run_trl(args, stamps: dict, folder: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            peak_at(stamps)

    settings = argparse.Namespace(
        trl_gradient_checkpointing="ckpt" in args.variant, batch_size=args.batch_size, warmup=0, steps=0, lr=1e-6
    )
    settings.seed = 1234
    common = {**_common.trl_common_args(settings, folder / "out"), "max_steps": -1, "num_train_epochs": 1}
    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data_file = trl_sft_file(args.data) if args.kind == "sft" else args.data
    rows = Dataset.from_list([json.loads(line) for line in data_file.read_text().splitlines()])
    if args.kind == "sft":
        config = SFTConfig(
            **common,
            max_length=args.max_length,
            packing="pack" in args.variant,
            packing_strategy="bfd",
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    else:
        config = DPOConfig(**common, max_length=args.max_length, beta=0.1, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    trainer.add_callback(Clock())
    trainer.train()


def run_variant(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    stamps: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        (run_ours if args.variant.startswith("ours") else run_trl)(args, stamps, Path(tmp))
    print(json.dumps({"seconds": stamps["end"] - stamps["start"], "peak_mib": stamps["peak_mib"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="sft,dpo")
    parser.add_argument("--variants", help="comma-separated, e.g. ours-ckpt-pack,trl-ckpt-pack (default: all)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-length", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=3456)
    parser.add_argument("--heads", type=int, default=20)
    for hidden in ("--kind", "--variant", "--model", "--data"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        args.model, args.data = Path(args.model), Path(args.data)
        run_variant(args)
        return

    import os

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    chosen = set(args.variants.split(",")) if args.variants else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_model(args, folder / "model")
        params = sum(p.numel() for p in load_file(model / "model.safetensors").values())
        sft_file, dpo_file, tokens = write_data(args, folder)
        print(
            f"random Llama, {params / 1e9:.2f}B parameters ({args.layers} layers, hidden {args.hidden}), fp32, "
            f"full fine-tune; {args.examples} HH records of {args.min_length}-{args.max_length} tokens, one epoch, "
            f"batch {args.batch_size}; {args.threads} thread(s) per run",
            flush=True,
        )
        results: dict[tuple[str, str], dict] = {}
        for kind in args.kinds.split(","):
            for variant in VARIANTS[kind]:
                if chosen is not None and variant not in chosen:
                    continue
                data_file = sft_file if kind == "sft" else dpo_file
                command = [sys.executable, str(HERE), *sys.argv[1:], "--kind", kind, "--variant", variant]
                command += ["--model", str(model), "--data", str(data_file)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=_common.ROOT, env=env)
                if done.returncode != 0:
                    sys.exit(f"{kind} {variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["tokens_per_s"] = tokens[kind] / result["seconds"]
                results[(kind, variant)] = result
                print(
                    f"{kind} {variant:<15} {result['tokens_per_s']:8.1f} tokens/s  "
                    f"peak {result['peak_mib'] / 1024:6.2f} GiB  ({result['seconds']:.0f} s)",
                    flush=True,
                )
        for kind in args.kinds.split(","):
            ran = {v: r for (k, v), r in results.items() if k == kind}
            leanest = {
                side: min((v for v in ran if v.startswith(side)), key=lambda v: ran[v]["peak_mib"], default=None)
                for side in ("ours", "trl")
            }
            if None not in leanest.values():
                a, b = ran[leanest["ours"]], ran[leanest["trl"]]
                print(
                    f"{kind}: {leanest['ours']} / {leanest['trl']} (each side's least memory): peak memory "
                    f"{a['peak_mib'] / b['peak_mib']:.2f}x, tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
