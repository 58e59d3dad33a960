"""`cai train rejection`: rejection sampling (best-of-K, as Llama 2 runs it). Each iteration samples K
answers per prompt from the current model (the vLLM engine), scores them with the reward models and
rules, keeps the best answer of each prompt as an SFT dataset, and fine-tunes the current model on it;
the next iteration samples from the fine-tuned model.

OUTPUT/
  iteration-N/best_of_k.jsonl   the winners in `messages` form, with every sample's reward
  iteration-N/best_of_k/        the same as a HF datasets folder
  iteration-N/sft/              that iteration's fine-tuning (checkpoints, metrics, final/)
  rejection.jsonl               per iteration: mean reward of all samples and of the winners
  final/                        the last iteration's model

A rerun reuses every iteration's written winners and resumes its fine-tuning where it stopped.
`sample_scored`, `write_sft_records`, `fine_tune` and `publish_final` are the pieces ReST (rest.py)
and HIR (hir.py) share; context distillation (distill.py) samples its teacher with `sample`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cai.core.disk import replaced_folder, write_atomic
from cai.core.errors import InputError
from cai.core.files import canonical_json
from cai.core.seeding import derive_seed
from cai.generate import prompts as prompt_sets
from cai.generate.backends import BackendSpec, ChatRequest, create
from cai.train import checkpoint, runtime, sft
from cai.train.config import SampledOptions, TrainConfig
from cai.train.metrics import PhaseLine
from cai.train.reward import Rewards


def begin(config: TrainConfig, section: str) -> tuple[list, Rewards, Path]:
    """What a sample-then-fine-tune trainer (rejection sampling, ReST) starts from: the prompts, the
    rewards of its `section` (validated), and the starting model; the config is recorded first, so a
    rerun with another config is refused before anything is sampled."""
    prompts = prompt_sets.load(config.train_data)[: config.limit]
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    rewards = Rewards.of(config, section, tokenizer, "cpu")
    checkpoint.record_config(config)
    return prompts, rewards, Path(runtime.model_path(config))


def train(config: TrainConfig) -> Path:
    options = config.rejection
    prompts, rewards, model = begin(config, "rejection")
    log = []
    for iteration in range(1, options.iterations + 1):
        folder = config.output_dir / f"iteration-{iteration}"
        winners = folder / "best_of_k.jsonl"
        if not winners.exists():
            sampled = sample_scored(config, options, prompts, model, rewards, "rejection", iteration)
            records = []
            for s in sampled:
                best = max(range(len(s.rewards)), key=s.rewards.__getitem__)
                records.append(
                    {
                        **sft_record(s, best),
                        "reward": s.rewards[best],
                        "sample_rewards": s.rewards,
                        "iteration": iteration,
                        "model": str(model),
                    }
                )
            rewards_all = [r for s in sampled for r in s.rewards]
            stats = {
                "prompts": len(records),
                "samples": len(rewards_all),
                "mean_reward": sum(rewards_all) / len(rewards_all),
                "mean_best_reward": sum(r["reward"] for r in records) / len(records),
            }
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "stats.json", json.dumps(stats) + "\n")
            write_sft_records(winners, records)
        log.append({"iteration": iteration, **json.loads((folder / "stats.json").read_text())})
        write_atomic(config.output_dir / "rejection.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        model = fine_tune(config, model, winners, folder / "sft")
    return publish_final(model, config.output_dir)


@dataclass(frozen=True)
class Sampled:
    """One prompt's K sampled answers and their combined rewards."""

    prompt: prompt_sets.Prompt
    texts: tuple[str, ...]
    rewards: list[float]


def sample_scored(
    config: TrainConfig,
    options: SampledOptions,
    prompts,
    model: Path,
    rewards: Rewards,
    stage: str,
    iteration: int,
    ask: Callable | None = None,
) -> list[Sampled]:
    """K answers per prompt from `model` (the vLLM engine, seeded per prompt and iteration), scored;
    prompts the engine could not take (too long) are left out. `ask` turns a prompt's messages into
    the conversation the model is given (HIR's instruction); the rewards score the answers against
    the prompt itself."""
    seeds = [derive_seed(config.seed, stage, iteration, p.id) for p in prompts]
    conversations = [tuple(ask(p.messages)) if ask else p.messages for p in prompts]
    what = f"{config.kind} round {iteration}: prompts sampled ({options.samples} answers each)"
    kept = [(prompts[i], texts) for i, texts in sample(config, options, conversations, seeds, model, what)]
    conversations = [list(p.messages) for p, texts in kept for _ in texts]
    scores, _ = rewards.score_texts(conversations, [text for _, texts in kept for text in texts])
    out, start = [], 0
    for p, texts in kept:
        out.append(Sampled(p, texts, scores[start : start + len(texts)].tolist()))
        start += len(texts)
    return out


def sample(
    config: TrainConfig, options, conversations, seeds: list[int], model: Path, what: str | None = None
) -> list[tuple[int, tuple[str, ...]]]:
    """`options.samples` answers to each conversation from `model` with the vLLM engine, one seed per
    conversation: (index, answers) of those the engine could take (the others are too long). The
    terminal shows how many conversations are answered (`what` names the phase)."""
    engine = create(
        BackendSpec(
            name="sampler",
            type="vllm",
            model=str(model),
            options={"max_model_len": config.max_length, **options.vllm_options},
        )
    )
    try:
        requests = [
            ChatRequest(
                messages=messages,
                max_tokens=options.max_new_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                seed=seed,
                n=options.samples,
            )
            for messages, seed in zip(conversations, seeds)
        ]
        line = PhaseLine(what or f"{config.kind}: prompts sampled", len(requests))
        try:
            completions = engine.complete(requests, progress=line.show)
        finally:
            line.close()
    finally:
        engine.close()
    kept = [(i, c.texts) for i, c in enumerate(completions) if c.ok]
    if not kept:
        raise InputError(
            str(config.train_data),
            None,
            f"no prompt fits the sampler's max_length {config.max_length}: {completions[0].error}",
        )
    return kept


def sft_record(sampled: Sampled, index: int) -> dict:
    """Answer `index` of a prompt's samples as an SFT record (`messages`, the prompt's `id`)."""
    return {
        "messages": [*sampled.prompt.messages, {"role": "assistant", "content": sampled.texts[index]}],
        "id": sampled.prompt.id,
    }


def write_sft_records(path: Path, records: list[dict]) -> None:
    """PATH.jsonl and PATH/ (a HF datasets folder); the JSONL last: its presence says both are complete."""
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = path.with_suffix("")
    shutil.rmtree(dataset, ignore_errors=True)
    Dataset.from_list(records).save_to_disk(str(dataset))
    write_atomic(path, "".join(canonical_json(r) + "\n" for r in records))


def fine_tune(config: TrainConfig, model: Path, data: Path, output_dir: Path) -> Path:
    """SFT of `model` on `data` with the config's shared training keys; resumes as `cai train sft` does."""
    return sft.train(
        replace(
            config,
            kind="sft",
            model=str(model),
            train_data=data,
            eval_data=None,
            eval_fraction=0.0,
            output_dir=output_dir,
        )
    )


def publish_final(model: Path, output_dir: Path) -> Path:
    """OUTPUT/final as a copy of `model`, swapped in whole."""
    final = output_dir / "final"
    with replaced_folder(final) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
    return final
