"""Our GRPO trainer against TRL's GRPOTrainer on the same model, prompts, K, lengths and steps: steps/s
and peak memory ratios (ours/TRL).

    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 4] [--warmup 1] [--rounds 2] [--batch-size 2]
        [--samples 4] [--max-new-tokens 32] [--beta 0.04] [--trl-gradient-checkpointing] [--threads 1]

The model is the embedded SmolLM2-135M-Instruct in fp32 on both sides, generating with HF `generate`
(no vLLM on either side) at temperature 1, top_k 0, top_p 1. The prompts are the project's red-team
demo prompts whose token lengths lie closest together (a batch's shape then hardly depends on the
order each trainer draws them in), each step `batch-size` prompts x `samples` answers of at most `max-new-tokens`
tokens. The reward is the same rule on both sides (the share of answer tokens among a fixed set, as
the tests use): its cost is nothing next to the model's. The settings match GRPO as the paper states
it on both sides: beta 0.04 (the reference model loaded and run every step; TRL's default is 0),
TRL's loss_type "grpo" (each answer's tokens averaged, then the answers: ours), scale_rewards "group",
one generation per optimizer step, one update per generation. Each run trains warmup + steps steps
in its own process; steps/s counts the timed steps only; peak memory is the process's peak RSS at its
last step (on a GPU, torch's peak allocated memory). Runs alternate between the sides (see
_common.run_sides); the ratios are of medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common

HERE = Path(__file__).resolve()
PROMPTS = _common.ROOT / "prompts" / "red_team_demo.jsonl"


def tokenizer():
    from cai.core import models
    from cai.train import runtime

    return runtime.load_tokenizer(models.resolve("smollm2", []))


def select_prompts(count: int) -> tuple[list[list[dict]], int, int]:
    """`count` distinct prompts whose chat-template lengths lie closest together (a batch's shape then
    hardly depends on which prompts it draws), with their shortest and longest length."""
    from cai.generate import prompts

    tok = tokenizer()
    conversations = [list(p.messages) for p in prompts.load(PROMPTS)]
    if count > len(conversations):
        sys.exit(f"{count} prompts needed, {PROMPTS.name} has {len(conversations)}")
    by_length = sorted(
        (len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)), i)
        for i, m in enumerate(conversations)
    )
    start = min(range(len(by_length) - count + 1), key=lambda s: by_length[s + count - 1][0] - by_length[s][0])
    window = by_length[start : start + count]
    return [conversations[i] for _, i in window], window[0][0], window[-1][0]


def target_tokens() -> list[str]:
    """The rule reward's tokens: single-token strings among ids 1000-1999 of SmolLM2's vocabulary."""
    tok = tokenizer()
    texts = [tok.decode([i]) for i in range(1000, 2000)]
    return [t for t in texts if len(tok.encode(t, add_special_tokens=False)) == 1]


def run_ours(args, clock: _common.StepClock, folder: Path) -> None:
    from cai.train import grpo

    doc = {
        "model": "smollm2",
        "data": {"train": str(args.data)},
        "output_dir": str(folder / "out"),
        "seed": args.seed,
        "max_steps": args.warmup + args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 0,
        "scheduler": "cosine",
        "max_length": 512,
        "precision": "fp32",
        "save_every": 10**6,
        "grpo": {
            "rewards": [{"name": "share", "rule": "token_fraction", "tokens": target_tokens()}],
            "samples": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "kl_beta": args.beta,
            "temperature": 1.0,
            "top_p": 1.0,
            "rollout": "hf",
        },
    }
    _common.time_ours(clock)
    grpo.train(_common.our_config("grpo", doc, folder))


def run_trl(args, clock: _common.StepClock, folder: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from cai.core import models

    path = models.resolve("smollm2", [])
    tok = tokenizer()
    targets = {tok.encode(t, add_special_tokens=False)[0] for t in target_tokens()}

    def share(completions, completion_ids, **kwargs):
        return [sum(i in targets for i in ids) / max(len(ids), 1) for ids in completion_ids]

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"prompt": json.loads(line)["messages"]} for line in args.data.read_text().splitlines()]
    common = _common.trl_common_args(args, folder / "out")
    common["per_device_train_batch_size"] = args.batch_size * args.samples  # TRL counts answers, ours prompts
    config = GRPOConfig(
        **common,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        steps_per_generation=1,
        use_vllm=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[share],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[_common.trl_callback(clock)],
    )
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_side_arguments(parser, lr=1e-6)
    parser.add_argument("--samples", type=int, default=4, help="K answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    args = parser.parse_args()

    if args.side is not None:
        _common.run_child(args, run_ours, run_trl)
        return
    if args.lora:
        sys.exit("--lora is not measured here")

    prompts, shortest, longest = select_prompts(args.batch_size * (args.warmup + args.steps))
    print(
        f"SmolLM2 fp32, full fine-tune, HF generation, {args.batch_size} prompts ({shortest}-{longest} tokens) x K={args.samples} answers of <= {args.max_new_tokens} "
        f"tokens a step, beta {args.beta}, {args.warmup} warm-up + {args.steps} timed steps, TRL gradient checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}, {args.threads} thread(s) per run",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "prompts.jsonl"
        data_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prompts), encoding="utf-8")
        results = _common.run_sides(HERE, sys.argv[1:], data_file, args)
    print(json.dumps(_common.report_ratios(results)))


if __name__ == "__main__":
    main()
