"""The units of an eval and their stable ids: an answer (a model's to a prompt) and a judgment (two
models' answers to a prompt compared under one axis' question)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from cai.core.files import content_hash
from cai.core.seeding import rng
from cai.generate.prompts import Prompt
from cai.rating.config import EvalConfig, RatedModel


def answer_id(config: EvalConfig, prompt: Prompt, model: RatedModel) -> str:
    return content_hash({"prompt": prompt.id, "model": model.identity, "seed": config.seed})


def judgment_id(config: EvalConfig, axis: str, prompt: Prompt, answers: tuple[str, str]) -> str:
    return content_hash(
        {
            "question": config.axes[axis].constitution.hash,
            "prompt": prompt.id,
            "answers": list(answers),
            "judge": config.judge_identity(),
            "seed": config.seed,
        }
    )


def model_pairs(config: EvalConfig, axis: str, prompt: Prompt) -> list[tuple[str, str]]:
    """The model pairs judged on a prompt: every pair, or each model with the baseline; with
    `pairs_per_prompt`, that many of them drawn for this prompt (seeded)."""
    names = list(config.models)
    if config.comparisons == "vs_baseline":
        pairs = [(config.baseline, m) for m in names if m != config.baseline]
    else:
        pairs = list(itertools.combinations(names, 2))
    if config.pairs_per_prompt is not None and len(pairs) > config.pairs_per_prompt:
        chosen = rng(config.seed, "pairs", axis, prompt.id).sample(range(len(pairs)), config.pairs_per_prompt)
        pairs = [pairs[k] for k in sorted(chosen)]
    return pairs


@dataclass(frozen=True)
class Judgment:
    """A planned comparison: the answers of two models to one prompt, under one axis' question."""

    id: str
    axis: str
    prompt: Prompt
    models: tuple[str, str]  # in the order of `answers`
    answers: tuple[str, str]  # answer ids, in id order: a pair is the same judgment whichever model is listed first


def plan(config: EvalConfig, prompts: dict[str, list[Prompt]]) -> list[Judgment]:
    """Every judgment the eval makes, axis by axis and prompt by prompt, in the file's order."""
    out = []
    for axis, axis_prompts in prompts.items():
        for prompt in axis_prompts:
            ids = {name: answer_id(config, prompt, model) for name, model in config.models.items()}
            for a, b in model_pairs(config, axis, prompt):
                first, second = sorted((a, b), key=lambda m: ids[m])
                answers = (ids[first], ids[second])
                out.append(Judgment(judgment_id(config, axis, prompt, answers), axis, prompt, (first, second), answers))
    return out
