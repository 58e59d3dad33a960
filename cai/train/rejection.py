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
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from cai import prompts as prompt_sets
from cai.backends import BackendSpec, ChatRequest, create
from cai.errors import InputError
from cai.files import canonical_json
from cai.seeding import derive_seed
from cai.store import write_atomic
from cai.train import checkpoint, runtime, sft
from cai.train.config import TrainConfig
from cai.train.reward import Rewards


def train(config: TrainConfig) -> Path:
    options = config.rejection
    prompts = prompt_sets.load(config.train_data)[: config.limit]
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    rewards = Rewards(options.rewards, options.gate, tokenizer, "cpu", str(config.file), "rejection.rewards")
    checkpoint.record_config(config)  # a rerun with another config is refused before anything is sampled
    model = Path(runtime.model_path(config))
    log = []
    for iteration in range(1, options.iterations + 1):
        folder = config.output_dir / f"iteration-{iteration}"
        winners = folder / "best_of_k.jsonl"
        if not winners.exists():
            records, stats = _best_of_k(config, prompts, model, rewards, iteration)
            _write_winners(folder, records)
            write_atomic(folder / "stats.json", json.dumps(stats) + "\n")
        log.append({"iteration": iteration, **json.loads((folder / "stats.json").read_text())})
        write_atomic(config.output_dir / "rejection.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        step = replace(config, kind="sft", model=str(model), train_data=winners, eval_data=None, eval_fraction=0.0, output_dir=folder / "sft")
        model = sft.train(step)
    final = config.output_dir / "final"
    tmp = config.output_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def _best_of_k(config: TrainConfig, prompts, model: Path, rewards: Rewards, iteration: int):
    options = config.rejection
    engine = create(BackendSpec(name="sampler", type="vllm", model=str(model), options={"max_model_len": config.max_length, **options.vllm_options}))
    try:
        requests = [
            ChatRequest(
                messages=p.messages, max_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                seed=derive_seed(config.seed, "rejection", iteration, p.id), n=options.samples,
            )  # fmt: skip
            for p in prompts
        ]
        completions = engine.complete(requests)
    finally:
        engine.close()
    kept = [(p, c) for p, c in zip(prompts, completions) if c.ok]
    if not kept:
        raise InputError(str(config.train_data), None, f"no prompt fits the sampler's max_length {config.max_length}: {completions[0].error}")
    conversations = [list(p.messages) for p, c in kept for _ in c.texts]
    scores, _ = rewards.score_texts(conversations, [text for _, c in kept for text in c.texts])
    records, start = [], 0
    for p, c in kept:
        mine = scores[start : start + len(c.texts)].tolist()
        start += len(c.texts)
        best = max(range(len(mine)), key=mine.__getitem__)
        records.append(
            {
                "messages": [*p.messages, {"role": "assistant", "content": c.texts[best]}],
                "id": p.id, "reward": mine[best], "sample_rewards": mine, "iteration": iteration, "model": str(model),
            }  # fmt: skip
        )
    stats = {"prompts": len(records), "samples": int(scores.numel()), "mean_reward": scores.mean().item(), "mean_best_reward": sum(r["reward"] for r in records) / len(records)}
    return records, stats


def _write_winners(folder: Path, records: list[dict]) -> None:
    """best_of_k.jsonl last: its presence says the iteration's winners are complete."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    dataset = folder / "best_of_k"
    shutil.rmtree(dataset, ignore_errors=True)
    Dataset.from_list(records).save_to_disk(str(dataset))
    write_atomic(folder / "best_of_k.jsonl", "".join(canonical_json(r) + "\n" for r in records))
