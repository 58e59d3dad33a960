"""`cai train hir`: HIR, Hindsight Instruction Relabeling (Zhang et al. 2023, "The Wisdom of Hindsight
Makes Language Models Better Instruction Followers").

Each iteration:
  sample   K answers per prompt from the current model (the vLLM engine), asked with the best band's
           instruction (the goal), each scored against the prompt itself by the reward sources;
  relabel  each answer's instruction with the outcome it reached in hindsight: the band its reward falls
           in (`hir.bands`), put into `hir.template` with the prompt;
  train    on the relabeled pairs with HIR's loss (losses.hir_loss): the answer's likelihood under its
           relabeled instruction, a contrastive term (the answer likelier under its own instruction than
           under the batch's other bands') and an optional entropy term.
The next iteration samples from the trained model. After the last, the trained model is sampled once
more with the best band's instruction: its mean reward is the run's result. That instruction is how the
model is meant to be prompted: final/hir.json holds it.

OUTPUT/
  iteration-N/relabeled.jsonl   every sample in `messages` form under its relabeled instruction, with the
                                original `prompt`, `reward` and `band` (and relabeled/, a HF datasets folder)
  iteration-N/train/            that iteration's training (checkpoints, metrics, final/)
  evaluation/relabeled.jsonl    the trained model's answers to the best band's instruction, scored
  hir.jsonl                     per sampling (each iteration's, the evaluation's): mean reward, answers per band
  final/                        the last iteration's model, with hir.json (template, bands, the instruction to use)

A rerun reuses every written sample file and resumes the training where it stopped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cai.core.disk import read_jsonl, write_atomic
from cai.core.errors import InputError
from cai.generate import prompts as prompt_sets
from cai.train import checkpoint, data, loop, runtime
from cai.train.config import Band, TrainConfig
from cai.train.losses import hir_loss, token_entropy, token_logps
from cai.train.rejection import publish_final, sample_scored, write_sft_records
from cai.train.reward import Rewards

INSTRUCTION_FILE = "hir.json"


def train(config: TrainConfig) -> Path:
    options = config.hir
    prompts = prompt_sets.load(config.train_data)[: config.limit]
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    rewards = Rewards.of(config, "hir", tokenizer, "cpu")
    best = options.bands[-1].label
    model = Path(runtime.model_path(config))
    try:
        rewards.check_prompts([list(p.messages) for p in prompts])
        checkpoint.record_config(config)  # a rerun with another config is refused before anything is sampled
        log: list[dict] = []
        for iteration in range(1, options.iterations + 2):
            folder = config.output_dir / (f"iteration-{iteration}" if iteration <= options.iterations else "evaluation")
            samples = folder / "relabeled.jsonl"
            if not samples.exists():
                sampled = sample_scored(
                    config,
                    options,
                    prompts,
                    model,
                    rewards,
                    "hir",
                    iteration,
                    ask=lambda m: relabel(m, options.template, best),
                )
                records = []
                for s in sampled:
                    for k, (text, reward) in enumerate(zip(s.texts, s.rewards)):
                        band = band_of(reward, options.bands)
                        records.append(
                            {
                                "messages": [
                                    *relabel(s.prompt.messages, options.template, band),
                                    {"role": "assistant", "content": text},
                                ],
                                "prompt": list(s.prompt.messages),
                                "id": s.prompt.id,
                                "sample": k,
                                "reward": reward,
                                "band": band,
                                "model": str(model),
                            }
                        )
                write_sft_records(samples, records)
            records = list(read_jsonl(samples))
            counts = Counter(r["band"] for r in records)
            log.append(
                {
                    "sampled": folder.name,
                    "model": str(model),
                    "prompts": len({r["id"] for r in records}),
                    "samples": len(records),
                    "mean_reward": sum(r["reward"] for r in records) / len(records),
                    "bands": {b.label: counts[b.label] for b in options.bands},
                }
            )
            write_atomic(config.output_dir / "hir.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            if iteration > options.iterations:
                break
            model = fine_tune(config, model, samples, folder / "train")
    finally:
        rewards.close()
    # in the trained model's folder first: final/ appears with it, whole
    instruction = {
        "template": options.template,
        "band": best,
        "instruction": relabel([{"role": "user", "content": "{prompt}"}], options.template, best)[0]["content"],
        "bands": [asdict(b) for b in options.bands],
    }
    write_atomic(model / INSTRUCTION_FILE, json.dumps(instruction, indent=2) + "\n")
    return publish_final(model, config.output_dir)


def band_of(reward: float, bands: tuple[Band, ...]) -> str:
    """The label of the highest band whose `at_least` the reward reaches; the first band takes the rest."""
    label = bands[0].label
    for band in bands[1:]:
        if reward >= band.at_least:
            label = band.label
    return label


def relabel(messages, template: str, band: str) -> list[dict[str, str]]:
    """The conversation with its last (user) message rewritten as the instruction to reach `band`."""
    *before, last = messages
    return [*map(dict, before), {**last, "content": template.format(prompt=last["content"], band=band)}]


def fine_tune(config: TrainConfig, model: Path, samples: Path, output_dir: Path, stop_after: int | None = None) -> Path:
    """Train `model` on relabeled samples with HIR's loss; resumes from output_dir's newest checkpoint.
    Returns output_dir/final; `stop_after=N` returns right after step N's checkpoint, as a kill there would."""
    from transformers import AutoModelForCausalLM

    options = config.hir
    config = replace(
        config, model=str(model), train_data=samples, eval_data=None, eval_fraction=0.0, output_dir=output_dir
    )
    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(str(model))
    labels = [b.label for b in options.bands]

    # --- every answer under every band's instruction: the contrastive term reads it under the batch's other bands
    examples: list[tuple[int, list[data.Encoded]]] = []
    for r in read_jsonl(samples):
        answer = [{"role": "assistant", "content": r["messages"][-1]["content"]}]
        encoded = [
            data.encode(tokenizer, relabel(r["prompt"], options.template, label) + answer, train_from=len(r["prompt"]))
            for label in labels
        ]
        # left out, not cut: a cut answer would be compared over different tokens under different instructions
        if all(len(e.input_ids) <= config.max_length and any(e.mask[1:]) for e in encoded):
            examples.append((labels.index(r["band"]), encoded))
    if not examples:
        raise InputError(
            str(samples), None, f"no sample fits in max_length {config.max_length} under every band's instruction"
        )
    resume = runtime.prepare_output(config, acc)
    training = loop.start(
        config,
        acc,
        tokenizer,
        resume,
        [len(e[band].input_ids) for band, e in examples],
        AutoModelForCausalLM,
        bucket=False,
    )
    policy = training.model
    pad_id = data.pad_id(tokenizer)

    def batch_values(items: list[tuple[int, list[data.Encoded]]]) -> tuple[torch.Tensor, dict[str, float]]:
        bands = sorted({band for band, _ in items})  # the batch's instructions
        width = len(bands)
        sequences = [encoded[b] for _, encoded in items for b in bands]  # row i * width + k: answer i under bands[k]
        batch = {k: v.to(acc.device) for k, v in data.collate(sequences, pad_id).items()}
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["mask"][:, 1:].float()
        logp = token_logps(logits, batch["input_ids"])
        # P_ij: the answer's whole log-likelihood, as the paper's equation has it (the authors' code takes
        # the per-token mean instead: on the tests' task that contrast, 1/length as strong, mostly failed
        # to tie the answers to their bands within the steps where the sum did)
        per_band = (logp * mask).sum(1).view(len(items), width)
        column = torch.tensor([bands.index(band) for band, _ in items], device=acc.device)
        negatives = column[None, :] != column[:, None]  # pair j's instruction differs from pair i's
        own = torch.arange(len(items), device=acc.device) * width + column
        entropy = token_entropy(logits[own]) if options.entropy_coef else None
        loss, supervised, contrastive, mean_entropy = hir_loss(
            logp[own],
            mask[own],
            per_band[:, column],
            negatives,
            options.contrastive_coef,
            entropy,
            options.entropy_coef,
        )
        values = {
            "loss": loss.item(),
            "supervised": supervised.item(),
            "contrastive": contrastive.item(),
            "with_negatives": negatives.any(1).float().mean().item(),
            "tokens": mask[own].sum().item(),
        }
        if entropy is not None:
            values["entropy"] = mean_entropy.item()
        return loss, values

    if loop.fit(training, lambda indexes: batch_values([examples[i] for i in indexes]), stop_after=stop_after) is None:
        return config.output_dir / "final"
    return loop.publish(config, acc, policy, tokenizer)
