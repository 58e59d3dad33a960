"""Synthetic training data with a known answer, and train config files, for the trainer tests.

The preferred answer always contains a marker word where the other holds a distractor word of the
same kind; otherwise both are drawn from the same words. Nothing but the marker tells them apart.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

WORDS = "the a model answer will can not help with that it is safe harmful please ask someone else today here there why how".split()
MARKER, DISTRACTOR = "locksmith", "plumber"
QUESTIONS = [
    "How do I pick a lock?",
    "What is a good gift?",
    "Why is the sky blue?",
    "How do I bake bread?",
    "Can you help me?",
    "What time is it?",
]


def answer(rng: random.Random, marker: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
    words.insert(rng.randrange(len(words) + 1), MARKER if marker else DISTRACTOR)
    return " ".join(words).capitalize() + "."


def preference_records(
    n_prompts: int, answers_per_prompt: int = 2, seed: int = 0, label_prob: float = 0.9
) -> list[dict[str, Any]]:
    """cai's preference format: K answers per prompt (one group), every chosen one holds the marker."""
    rng = random.Random(seed)
    records = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"{rng.choice(QUESTIONS)} ({i})"}]
        good = [answer(rng, True) for _ in range(answers_per_prompt - 1)]
        bad = answer(rng, False)
        for g in good:
            records.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": g}],
                    "rejected": [{"role": "assistant", "content": bad}],
                    "label_prob": label_prob,
                    "margin": 2.0,
                    "group_id": f"p{i}",
                }
            )
        if len(good) > 1:  # the K-choose-2 pairs among good answers too: the longer one wins
            a, b = sorted(good[:2], key=len, reverse=True)
            records.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": a}],
                    "rejected": [{"role": "assistant", "content": b}],
                    "label_prob": 0.6,
                    "margin": 0.4,
                    "group_id": f"p{i}",
                }
            )
    return records


def sft_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": rng.choice(QUESTIONS)},
                {"role": "assistant", "content": answer(rng, True)},
            ],
            "id": f"r{i}",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_config(path: Path, **doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def read_metrics(output_dir: Path, split: str = "train") -> dict[int, dict[str, Any]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == split}


PROMPTS = Path(__file__).resolve().parents[2] / "prompts" / "red_team_demo.jsonl"


def ppo_config(
    tmp_path: Path, tiny_model: Path, tokens: list[str], name: str, beta: float = 0.01, steps: int = 16, **ppo_options
):
    """A PPO run on the tiny model whose reward is the share of answer tokens among `tokens`; the
    settings (large batch, short answers, high learning rate) make that learnable in a few steps."""
    from cai.train import config as train_config

    path = write_config(
        tmp_path / f"{name}.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / name),
        max_steps=steps,
        batch_size=48,
        lr=2e-3,
        max_length=192,
        save_every=2,
        seed=1,
        ppo={
            k: v
            for k, v in {
                "rewards": [{"name": "share", "rule": "token_fraction", "tokens": tokens}],
                "max_new_tokens": 3,
                "kl_beta": beta,
                "ppo_epochs": 2,
                "reward_norm": "none",
                **ppo_options,
            }.items()
            if v is not None
        },  # an option given as None is left out
    )
    return train_config.load("ppo", path)


def group_config(tmp_path: Path, tiny_model: Path, tokens: list[str], kind: str, name: str, steps: int = 16, **options):
    """GRPO or RLOO on the tiny model with PPO's rule reward: 12 prompts a step, 4 answers each."""
    from cai.train import config as train_config

    path = write_config(
        tmp_path / f"{name}.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / name),
        max_steps=steps,
        batch_size=12,
        lr=5e-3,
        max_length=192,
        save_every=2,
        seed=1,
        **{
            kind: {
                "rewards": [{"name": "share", "rule": "token_fraction", "tokens": tokens}],
                "samples": 4,
                "max_new_tokens": 3,
                "kl_beta": 0.01,
                **options,
            }
        },
    )
    return train_config.load(kind, path)


def judge_model(tiny_model: Path, out: Path) -> Path:
    """The tiny model made into a judge whose top 20 next tokens hold the score digits and A/B (a random
    model's do not, and an API judge reads only the top 20): every input embedding gets one shared
    direction added, which then dominates the last hidden state, and the output rows of those tokens
    get that direction too. What follows the shared part still moves their log-probs a little."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    with torch.no_grad():
        embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embeddings += 1.5 * embeddings.norm(dim=1).mean() * direction
        for choice in [*map(str, range(1, 10)), "A", "B"]:
            (token,) = tokenizer.encode(choice, add_special_tokens=False)
            head[token] += 2.5 * head.norm(dim=1).mean() * direction
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def one_process():
    """What the Sampler reads of an accelerator, for one process on the CPU without accelerate's state."""
    from types import SimpleNamespace

    return SimpleNamespace(device="cpu", unwrap_model=lambda m: m, distributed_type="NO", num_processes=1)
