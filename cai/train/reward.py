"""`cai train rm`: a scalar reward model trained on preference pairs, and the scorer later stages use.

The model is the causal LM with transformers' sequence-classification head (AutoModelForSequence-
Classification, num_labels=1): a linear head reading the hidden state of the last non-pad token.
Chosen for interoperability: the checkpoint is the format TRL's RewardTrainer, OpenRLHF and vLLM's
reward serving load as they are, and save/resume/LoRA (task SEQ_CLS keeps the head trainable) come
for free. Ranking loss is Bradley-Terry per pair, with the Llama 2 margin or the CAI paper's soft
labels from the dataset's columns when enabled.

InstructGPT batching: a prompt's pairs (same `group_id`) go in one batch, each distinct answer goes
through the model once, and the loss over the prompt's pairs is their mean (every prompt weighs the
same, however many pairs it has). A prompt's K answers share one packed row that holds the prompt once
(score_groups), as DPO's pairs do. `rm.pretrain` first trains on a generic comparison set (PMP). After training, the mean reward over the training answers is
stored as an offset (final/reward.json) that RewardScorer subtracts, so rewards are centred at 0.

Against the length shortcut: each pair's loss carries a weight (its data.train file's, made
length-balanced with `length_balance`); `length_coef` adds |corr(r_c - r_r, length difference)| over
the batch and the `length_window` pairs before it; `heads: 2` is ODIN (a quality and a length head,
the ranking loss on their sum, the decorrelation and orthogonality terms), and final/ keeps the
quality head alone. The held-out figures
include the accuracy on chosen-longer and chosen-shorter pairs (eval_judge.length_figures).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.core.files import canonical_json
from cai.judge.eval_judge import length_figures, wilson_interval
from cai.train import checkpoint, data, loop, runtime
from cai.train.config import DataFile, JudgeSource, PreferenceSource, TrainConfig, packed_row
from cai.train.losses import (
    CorrelationWindow,
    bradley_terry_loss,
    length_correlation_penalty,
    odin_length_loss,
    orthogonality_loss,
    pairwise_credit,
    pearson_correlation,
    reward_centering_loss,
)
from cai.train.metrics import mean, plot

REWARD_FILE = "reward.json"


def train(config: TrainConfig, stop_after: int | None = None, centre: bool = True) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint, as a kill
    there would (of the main phase: a pretraining phase runs to its end first). `centre`: score every
    training answer for the offset; a pretraining phase does not (the main phase centres its own
    rewards, and scoring a generic comparison set took most of its time)."""
    from transformers import AutoModelForSequenceClassification

    if config.rm.pretrain is not None:
        config = pretrained(config)
    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    options = config.rm

    # --- data: validated before anything is written
    pairs, eval_pairs = data.preference_splits(config)
    if options.use_soft_labels:
        data.require_column(config, pairs, "label_prob", "rm.use_soft_labels")
    if options.use_margin:
        data.require_column(config, pairs, "margin", "rm.use_margin")
    groups, dropped = data.group_pairs(tokenizer, pairs, config.max_length)
    eval_groups, _ = data.group_pairs(tokenizer, eval_pairs, config.max_length)
    if not groups:
        raise InputError(str(config.train_data), None, f"no pair fits in max_length {config.max_length}")
    if dropped:
        runtime.note(acc, f"left out {dropped} pairs longer than max_length {config.max_length}")
    groups, weighting = weighted(groups, options.length_balance)
    if options.length_balance or config.data_files()[1:]:
        runtime.note(acc, data.weights_line(weighting))

    resume = runtime.prepare_output(config, acc)
    pad_id = data.pad_id(tokenizer)
    training = loop.start(
        config,
        acc,
        tokenizer,
        resume,
        [g.packed_tokens if config.packing else g.tokens for g in groups],
        AutoModelForSequenceClassification,
        task_type="SEQ_CLS",
        num_labels=options.heads,
        ignore_mismatched_sizes=options.heads > 1,  # a one-head model (a pretraining phase's) gets both heads fresh
        pad_token_id=pad_id,
    )
    model = training.model

    capacity = packed_row(config)[0] if config.packing else None
    window = CorrelationWindow(options.length_window)

    def batch_values(
        batch: list[data.Group], training: bool = False
    ) -> tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor, ...]]:
        """Every distinct answer of the batch's prompts scored once; all pair losses from those rewards.
        With two heads (ODIN) the ranking loss reads their sum and the figures the quality head alone.
        Also returns (chosen, rejected, token-length difference) per pair, for the held-out figures.
        `training`: a training batch, its prompts' groups packed into rows of `capacity` tokens and its
        pairs joining the length window."""
        heads = score_groups(
            model,
            [g.answers for g in batch],
            pad_id,
            acc.device,
            all_heads=True,
            capacity=capacity if training else None,
        )
        rewards = heads.sum(-1)  # one head: its reward; two: r = r^Q + r^L
        losses, chosen_all, rejected_all, diffs, start = [], [], [], [], 0
        for g in batch:
            chosen = rewards[start + torch.tensor([c for c, _, _, _ in g.pairs], device=acc.device)]
            rejected = rewards[start + torch.tensor([r for _, r, _, _ in g.pairs], device=acc.device)]
            quality_chosen = heads[start + torch.tensor([c for c, _, _, _ in g.pairs], device=acc.device), 0]
            quality_rejected = heads[start + torch.tensor([r for _, r, _, _ in g.pairs], device=acc.device), 0]
            start += len(g.answers)
            margin = torch.tensor([m for _, _, _, m in g.pairs], device=acc.device) if options.use_margin else None
            label_prob = (
                torch.tensor([p for _, _, p, _ in g.pairs], device=acc.device) if options.use_soft_labels else None
            )
            pair_losses = bradley_terry_loss(chosen, rejected, margin=margin, label_prob=label_prob)
            if g.weights:
                pair_losses = pair_losses * torch.tensor(g.weights, device=acc.device)
            losses.append(pair_losses.mean())
            chosen_all.append(quality_chosen)
            rejected_all.append(quality_rejected)
            diffs += g.length_diffs()
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        length_diff = torch.tensor(diffs, device=acc.device, dtype=torch.float32)
        loss = torch.stack(losses).mean()
        if options.center_coef:
            loss = loss + reward_centering_loss(chosen, rejected, options.center_coef)
        figures = {}
        # over the length window when training with one: a batch's few pairs say little
        correlation = pearson_correlation(chosen - rejected, length_diff).item()
        if options.heads == 2:
            lengths = torch.tensor([float(n) for g in batch for n in answer_lengths(g)], device=acc.device)
            odin = odin_length_loss(heads[:, 0], heads[:, 1], lengths)
            orthogonal = orthogonality_loss(*head_weight(model)[:2])
            loss = loss + options.length_coef * odin + options.orthogonal_coef * orthogonal
            figures = {"length_loss": odin.item(), "orthogonality": orthogonal.item()}
        elif options.length_coef and training:
            term, correlation = window.penalty(chosen - rejected, length_diff, options.length_coef)
            loss = loss + term
        elif options.length_coef:
            loss = loss + length_correlation_penalty(chosen - rejected, length_diff, options.length_coef)
        return (
            loss,
            {
                "loss": loss.item(),
                "accuracy": pairwise_credit(chosen, rejected).mean().item(),
                "reward_margin": (chosen - rejected).mean().item(),
                "mean_reward": heads[:, 0].mean().item(),
                "length_correlation": correlation,
                **figures,
            },
            (chosen.detach(), rejected.detach(), length_diff),
        )

    held: list[tuple[torch.Tensor, ...]] = []
    final_figures: dict[str, object] = {}

    def eval_chunk(indexes: list[int]) -> dict[str, float]:
        _, figures, scored = batch_values([eval_groups[i] for i in indexes])
        held.append(scored)
        return figures

    def eval_combine(chunks: list[dict[str, float]]) -> dict[str, float]:
        """The chunks' mean loss; the pair figures over all held-out pairs at once, as final/reward.json
        gives them (a mean over chunks would weigh pairs unevenly: the last chunk is smaller, and a chunk
        holds whole prompts' groups of pairs)."""
        chosen, rejected, diff = (torch.cat(parts).cpu() for parts in zip(*held))
        held.clear()
        final_figures.clear()
        # token lengths: cut at 0 they only say which answer is the longer
        final_figures.update(pair_figures(chosen, rejected, diff.clamp(min=0).tolist(), (-diff).clamp(min=0).tolist()))
        pooled = {
            "accuracy": final_figures["accuracy"],
            "reward_margin": final_figures["mean_margin"],
            "length_correlation": pearson_correlation(chosen - rejected, diff).item(),
        }
        splits = {k: final_figures[k] for k in SPLIT_FIGURES if final_figures[k] is not None}
        return {**mean(chunks), **pooled, **splits}

    eval_result = loop.fit(
        training,
        lambda indexes: batch_values([groups[i] for i in indexes], training=True)[:2],
        loop.evaluator(training, len(eval_groups), eval_chunk, eval_combine),
        stop_after,
    )
    if eval_result is None:
        return config.output_dir / "final"

    # --- centre: the mean reward over the training answers becomes the offset scoring subtracts
    model.eval()
    answers = [g.answers for g in groups]
    offset = None
    if centre:
        with torch.no_grad():
            size = config.eval_batch_size or config.batch_size
            offset = (
                torch.cat(
                    [
                        score_groups(model, answers[i : i + size], pad_id, acc.device)
                        for i in range(0, len(answers), size)
                    ]
                )
                .mean()
                .item()
            )
    if options.heads == 2:
        keep_quality_head(model)
    final = checkpoint.save_final(acc, model, tokenizer, config.output_dir)
    if acc.is_main_process:
        summary = {
            "offset": offset,  # null: not centred (a pretraining phase's model)
            "train_answers": sum(len(a) for a in answers),
            "eval_accuracy": eval_result.get("accuracy"),
            "eval": dict(final_figures) or None,  # the last held-out evaluation's figures, lengths in tokens
            "train_weights": weighting,
            "heads": options.heads,
        }
        write_atomic(final / REWARD_FILE, json.dumps(summary, indent=2) + "\n")
        plot(config.output_dir / "metrics.jsonl", config.output_dir / "curves.png")
    return final


SPLIT_FIGURES = ("accuracy_chosen_longer", "accuracy_chosen_shorter", "length_balanced_accuracy")


def weighted(groups: list[data.Group], balance: bool) -> tuple[list[data.Group], dict]:
    """The groups with each pair's loss weight (data.pair_weights: its file's, length-balanced with
    `balance`), and the weights' summary."""
    diffs = [d for g in groups for d in g.length_diffs()]
    given = [w for g in groups for w in (g.weights or (1.0,) * len(g.pairs))]
    weights, summary = data.pair_weights(given, diffs, balance)
    out, start = [], 0
    for g in groups:
        out.append(replace(g, weights=tuple(weights[start : start + len(g.pairs)])))
        start += len(g.pairs)
    return out, summary


def answer_lengths(group: data.Group) -> list[int]:
    """Each answer's tokens after the group's shared prompt (a few shared leading answer tokens aside)."""
    shared = data.shared_prefix(group.answers)
    return [len(a) - shared for a in group.answers]


def head_weight(model) -> torch.Tensor:
    """The reward head's weight [heads, hidden]: the trained copy (under LoRA the head is wrapped, its
    original frozen)."""
    from accelerate.utils import extract_model_from_parallel

    head = extract_model_from_parallel(model).score
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad][-1].weight


@torch.no_grad()
def keep_quality_head(model) -> None:
    """ODIN's inference model: the quality head alone (row 0), so final/ is a one-head reward model any
    loader reads as usual (RewardScorer, TRL, vLLM's reward serving)."""
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    for linear in [m for m in unwrapped.score.modules() if isinstance(m, torch.nn.Linear)]:
        linear.weight = torch.nn.Parameter(linear.weight[:1].clone())
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias[:1].clone())
        linear.out_features = 1
    unwrapped.config.num_labels = 1


def pretrained(config: TrainConfig) -> TrainConfig:
    """Preference-model pretraining (Askell et al. 2021): the reward model first learns from a generic
    comparison set (`rm.pretrain.data`, hard labels: such sets have no judge probabilities) in
    OUTPUT/pretrain, a training of its own that resumes the same way; the main phase then starts from
    its model. Returns the main phase's config."""
    data.load_preferences(config.train_data, config.limit)  # the main data's errors before hours of pretraining
    options = config.rm.pretrain
    folder = config.output_dir / "pretrain"
    if not (folder / "final" / REWARD_FILE).exists():
        train(
            replace(
                config,
                train_data=options.data,
                train_files=(DataFile(options.data),),
                limit=options.limit,
                eval_data=config.eval_data,
                eval_fraction=0.0,
                output_dir=folder,
                max_steps=options.max_steps,
                epochs=options.epochs,
                lr=options.lr or config.lr,
                # one head: the main phase starts its heads fresh when it has two
                rm=replace(config.rm, pretrain=None, use_margin=False, use_soft_labels=False, heads=1),
            ),
            centre=False,
        )
    return replace(config, model=str((folder / "final").resolve()))


def score_groups(
    model, groups: list[list[list[int]]], pad_id: int, device, all_heads: bool = False, capacity: int | None = None
) -> torch.Tensor:
    """One scalar reward per token sequence, in order (the first head's; `all_heads`: [N, heads]). Each
    group's sequences (one prompt's answers) go in one packed row that holds their shared prompt once
    (data.collate_groups; with a `capacity`, several groups to a row), and the head is read at each
    sequence's last token: the same rewards as each sequence on its own, the prompt computed once.

    The model's own forward pools the head's output at a row's last token only; a forward hook on the
    head gets its output at every position. Going through the model's forward (not its parts) keeps
    DDP's gradient sync and PEFT's adapters in play.
    """
    from accelerate.utils import extract_model_from_parallel

    batch = {k: v.to(device) for k, v in data.collate_groups(groups, pad_id, capacity).items()}
    head = extract_model_from_parallel(model).score  # a PEFT model forwards the attribute to its base
    outputs = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=data.additive_mask(batch["attention_mask"], next(model.parameters()).dtype),
            position_ids=batch["position_ids"],
        )
    finally:
        handle.remove()
    rewards = outputs[0][batch["row"], batch["end"]].float()
    return rewards if all_heads else rewards[:, 0]


# ----------------------------------------------------------------------------- scoring for later stages


class RewardScorer:
    """One or more trained reward models combined by weights into one reward:

        r = sum_i w_i (r_i - offset_i)

    With a gate (Llama 2's safety gate), where the gate model's centred reward is below `threshold`,
    the reward is that model's alone: an unsafe answer is not rescued by being helpful.
    """

    def __init__(
        self,
        models: dict[str, tuple[str | Path, float]],
        gate: tuple[str, float] | None = None,
        device: str | None = None,
        batch_size: int = 8,
        load_options: dict | None = None,
    ):
        from transformers import AutoModelForSequenceClassification

        if gate is not None and gate[0] not in models:
            raise ValueError(f"gate model {gate[0]!r} is not among the reward models ({', '.join(models)})")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.gate = gate
        self.models = {}
        for name, (path, weight) in models.items():
            tokenizer = runtime.load_tokenizer(str(path))
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, pad_token_id=data.pad_id(tokenizer), **(load_options or {})
            )
            model = runtime.loaded_everywhere(model.to(self.device).eval())
            offset_file = Path(path) / REWARD_FILE
            offset = (json.loads(offset_file.read_text())["offset"] or 0.0) if offset_file.exists() else 0.0
            self.models[name] = (model, tokenizer, float(weight), offset)

    @torch.no_grad()
    def score_each(self, prompts: list[data.Messages], answers: list[str]) -> dict[str, torch.Tensor]:
        """Each model's centred reward for each (prompt messages, answer text). The answers of one prompt
        (rejection sampling's K samples) are scored in one packed row, the prompt computed once;
        `batch_size` prompts per forward pass."""
        by_prompt: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt.setdefault(canonical_json(prompt), []).append(i)
        groups = list(by_prompt.values())
        out = {}
        for name, (model, tokenizer, _, offset) in self.models.items():
            ids = [
                data.encode(tokenizer, p + [{"role": "assistant", "content": a}]).input_ids
                for p, a in zip(prompts, answers)
            ]
            scores = torch.empty(len(ids))
            for i in range(0, len(groups), self.batch_size):
                chunk = groups[i : i + self.batch_size]
                scores[[j for g in chunk for j in g]] = score_groups(
                    model, [[ids[j] for j in g] for g in chunk], data.pad_id(tokenizer), self.device
                ).cpu()
            out[name] = scores - offset
        return out

    def score(self, prompts: list[data.Messages], answers: list[str]) -> torch.Tensor:
        weights = {name: weight for name, (_, _, weight, _) in self.models.items()}
        return combine(self.score_each(prompts, answers), weights, self.gate)


def combine(
    each: dict[str, torch.Tensor], weights: dict[str, float], gate: tuple[str, float] | None = None
) -> torch.Tensor:
    """sum_i w_i r_i; with a gate (name, threshold), that reward alone wherever it is below the threshold."""
    combined = sum(weight * each[name] for name, weight in weights.items())
    if gate is None:
        return combined
    name, threshold = gate
    return torch.where(each[name] < threshold, each[name], combined)


class JudgeError(Exception):
    """A judge call that failed after its retries, or a verdict without a usable score: the step stops
    with the reason (never a silent zero reward)."""


class Judge:
    """The constitution's judge (any backend a pipeline may use) as a live reward, on an event loop of
    its own so that its calls run while the trainer computes log-probs.

    score:    d-RLAIF (Lee et al. 2023): the expected score over the tokens 1..10 (cai.generate.stages.score's
              prompt), averaged over `principles` comparison principles drawn per answer.
    pairwise: P(answer beats another answer) under each principle, the judge asked in both orders and
              the two averaged (cai.generate.stages.compare's prompt, RLAIF's position debiasing), averaged over
              the principles. The other answer is the prompt's reference answer (a reward), or one
              given with each answer (Nash-MD's preference between two sampled answers).
    The principles are drawn from (seed, prompt, answer): the same answer gets the same principles.
    """

    def __init__(self, spec: JudgeSource, seed: int):
        from cai.generate import constitution
        from cai.generate.backends.base import LoopThread, start

        self.spec, self.seed = spec, seed
        self.constitution = constitution.load(spec.constitution)
        self.references = {}
        if spec.references is not None:
            for messages in data.load_sft(spec.references):
                self.references[canonical_json(messages[:-1])] = messages[-1]["content"]
        self.loop = LoopThread(f"cai-judge-{spec.backend.name}")
        try:
            self.backend = self.loop.run(start(spec.backend))
        except BaseException:
            self.loop.stop()
            raise

    def check_prompts(self, prompts: list[data.Messages], file: str, field: str) -> None:
        """Pairwise: every prompt needs its reference answer, found before training starts."""
        if self.spec.mode == "pairwise":
            missing = sum(canonical_json(list(p)) not in self.references for p in prompts)
            if missing:
                raise InputError(
                    file, f"{field}.references", f"no reference answer for {missing} of the {len(prompts)} prompts"
                )

    def submit(self, prompts: list[data.Messages], answers: list[str], others: list[str] | None = None) -> Future:
        """Start scoring; the future holds one reward per answer. Pairwise, `others` are the answers each
        is compared with (default: the prompts' reference answers)."""
        return asyncio.run_coroutine_threadsafe(
            self._score(prompts, answers, others or [None] * len(answers)), self.loop.loop
        )

    async def _score(self, prompts: list[data.Messages], answers: list[str], others: list[str | None]) -> torch.Tensor:
        from cai.generate.backends.base import BackendCallError

        try:
            scores = await asyncio.gather(*(self._one(list(p), a, o) for p, a, o in zip(prompts, answers, others)))
        except BackendCallError as exc:
            raise JudgeError(str(exc)) from None
        return torch.tensor(scores, dtype=torch.float32)

    async def _one(self, messages: data.Messages, answer: str, other: str | None) -> float:
        from cai.core.seeding import rng
        from cai.generate import feedback
        from cai.generate.backends.base import ChatRequest
        from cai.generate.stages.compare import (
            ANSWER_INSTRUCTION,
            OPTIONS,
            conversation_text,
            draw_distinct,
            judge_messages,
        )
        from cai.generate.stages.score import SCORE_TEMPLATE, SCORES

        principles = draw_distinct(
            self.constitution, self.spec.principles, rng(self.seed, "judge", canonical_json(messages), answer)
        )
        if self.spec.mode == "score":
            conversation = conversation_text(messages)

            async def verdict(principle) -> float | None:
                content = SCORE_TEMPLATE.format(conversation=conversation, question=principle.comparison, answer=answer)
                logprobs = await self.backend.choice_logprobs(
                    ChatRequest(messages=({"role": "user", "content": content},)), [str(s) for s in SCORES]
                )
                return feedback.expected_score(logprobs, SCORES)
        else:
            reference = self.references[canonical_json(messages)] if other is None else other

            async def verdict(principle) -> float | None:
                async def p_first(first: str, second: str) -> float | None:
                    asked = ChatRequest(messages=judge_messages(messages, principle, first, second, ANSWER_INSTRUCTION))
                    probs = feedback.normalise(await self.backend.choice_logprobs(asked, OPTIONS), OPTIONS)
                    return None if probs is None else probs["A"]

                shown_first, shown_second = await asyncio.gather(p_first(answer, reference), p_first(reference, answer))
                if shown_first is None or shown_second is None:
                    return None
                return feedback.swap_average(shown_first, 1 - shown_second)

        verdicts = await asyncio.gather(*(verdict(p) for p in principles))
        if any(v is None for v in verdicts):
            raise JudgeError(
                f"judge: no usable {self.spec.mode} verdict (no log-probability on the expected tokens) for an answer to {conversation_text(messages)[:80]!r}"
            )
        return feedback.ensemble(verdicts)

    def close(self) -> None:
        try:
            self.loop.run(self.backend.close())
        finally:
            self.loop.stop()


class Rewards:
    """Reward models, rules (`token_fraction`: the share of answer tokens among given tokens) and the
    judge, combined by weight (and gate) into one reward per answer: what the online trainers and
    rejection sampling optimise. `start` sends the judge its calls at once and returns; the trainer
    does its own work meanwhile and collects the rewards with `Pending.result`."""

    def __init__(
        self,
        sources,
        gate: tuple[str, float] | None,
        tokenizer,
        device,
        file: str,
        field: str,
        seed: int = 0,
        load_options: dict | None = None,
    ):
        models = {s.name: (s.model, s.weight) for s in sources if s.model is not None}
        self.scorer = RewardScorer(models, device=str(device), load_options=load_options) if models else None
        self.weights = {s.name: s.weight for s in sources}
        self.gate = gate
        self.tokenizer = tokenizer
        self.file, self.field = file, field
        self.rules: dict[str, torch.Tensor] = {}
        self.judges: dict[str, tuple[int, Judge]] = {}
        for index, source in enumerate(sources):
            if source.model is None and source.judge is None:
                ids = []
                for token in source.tokens:
                    encoded = tokenizer.encode(token, add_special_tokens=False)
                    if len(encoded) != 1:
                        raise InputError(
                            file,
                            f"{field}[{index}].tokens",
                            f"{token!r} is {len(encoded)} tokens for this tokenizer, not one",
                        )
                    ids.append(encoded[0])
                self.rules[source.name] = torch.tensor(sorted(set(ids)))
        for index, source in enumerate(sources):  # last: a judge engine starts only for a config found good
            if source.judge is not None:
                self.judges[source.name] = (index, Judge(source.judge, seed))

    @classmethod
    def of(cls, config: TrainConfig, section: str, tokenizer, device) -> Rewards:
        """A training's rewards: its `section`'s sources and gate, its seed, reward models loaded with the
        trained model's load options; errors name `section.rewards` in the config file."""
        options = getattr(config, section)
        return cls(
            options.rewards,
            options.gate,
            tokenizer,
            device,
            str(config.file),
            f"{section}.rewards",
            config.seed,
            runtime.load_options(config),
        )

    def check_prompts(self, prompts: list[data.Messages]) -> None:
        for name, (index, judge) in self.judges.items():
            judge.check_prompts(prompts, self.file, f"{self.field}[{index}].judge")

    def start(
        self, prompts: list[data.Messages], texts: list[str], responses: torch.Tensor, mask: torch.Tensor
    ) -> Pending:
        """Send the judges their calls; the other sources are computed when the result is collected."""
        return Pending(
            self,
            {name: judge.submit(prompts, texts) for name, (_, judge) in self.judges.items()},
            prompts,
            texts,
            responses,
            mask,
        )

    def score(
        self, prompts: list[data.Messages], texts: list[str], responses: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(combined reward, each source's) for answers given as text and as token ids with their mask."""
        combined, each, _ = self.start(prompts, texts, responses, mask).result()
        return combined, each

    def score_texts(
        self, prompts: list[data.Messages], texts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        mask = data.pad([[1] * len(i) or [0] for i in ids], 0).float()  # an empty answer holds no token of any rule
        return self.score(
            prompts,
            texts,
            data.pad([i or [data.pad_id(self.tokenizer)] for i in ids], data.pad_id(self.tokenizer)),
            mask,
        )

    def close(self) -> None:
        for _, judge in self.judges.values():
            judge.close()


@dataclass
class Pending:
    """Rewards whose judge calls are in flight."""

    rewards: Rewards
    judged: dict[str, Future]
    prompts: list[data.Messages]
    texts: list[str]
    responses: torch.Tensor
    mask: torch.Tensor

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """(combined reward, each source's, seconds spent waiting for the judges)."""
        r = self.rewards
        each = r.scorer.score_each(self.prompts, self.texts) if r.scorer else {}
        for name, ids in r.rules.items():
            hits = torch.isin(self.responses.cpu(), ids).float() * self.mask.cpu()
            each[name] = hits.sum(1) / self.mask.cpu().sum(1).clamp(min=1)
        started = time.perf_counter()
        for name, future in self.judged.items():
            each[name] = future.result()  # a JudgeError from the loop is raised here
        return combine(each, r.weights, r.gate), each, time.perf_counter() - started


class Preference:
    """Nash-MD's P(y > y' | x) between two answers to each prompt: a reward model's Bradley-Terry
    probability sigmoid(r(y) - r(y')) (its offset cancels), or the judge's swap-averaged pairwise
    probability. `start` sends the judge its calls and returns at once; calling what it returns
    collects the probabilities (a reward model computes them then)."""

    def __init__(self, source: PreferenceSource, device, seed: int, load_options: dict | None = None):
        self.scorer = (
            RewardScorer({"preference": (source.model, 1.0)}, device=str(device), load_options=load_options)
            if source.model is not None
            else None
        )
        self.judge = Judge(source.judge, seed) if source.judge is not None else None

    def start(self, prompts: list[data.Messages], answers: list[str], others: list[str]) -> Callable[[], torch.Tensor]:
        if self.judge is not None:
            return self.judge.submit(prompts, answers, others).result

        def bradley_terry() -> torch.Tensor:
            rewards = self.scorer.score(
                prompts + prompts, answers + others
            )  # a prompt's two answers share a packed row
            return torch.sigmoid(rewards[: len(answers)] - rewards[len(answers) :])

        return bradley_terry

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def evaluate_pairs(scorer: RewardScorer, pairs: list[data.Pair]) -> dict[str, object]:
    """Pairwise accuracy (ties count half) with its 95% Wilson interval, the mean reward margin, and
    eval-judge's length figures (accuracy on chosen-longer and chosen-shorter pairs, their mean the
    length-balanced accuracy; lengths in characters)."""
    prompts = [p.prompt for p in pairs]
    chosen_texts, rejected_texts = [p.chosen[-1]["content"] for p in pairs], [p.rejected[-1]["content"] for p in pairs]
    chosen = scorer.score(prompts, chosen_texts)
    rejected = scorer.score(prompts, rejected_texts)
    return pair_figures(chosen, rejected, [len(t) for t in chosen_texts], [len(t) for t in rejected_texts])


def pair_figures(
    chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths: list[int], rejected_lengths: list[int]
) -> dict[str, object]:
    """A reward model's figures on pairs from their rewards and their answers' lengths (evaluate_pairs)."""
    credit = pairwise_credit(chosen, rejected)
    n = len(credit)
    return {
        "n": n,
        "accuracy": credit.mean().item(),
        "accuracy_ci95": list(wilson_interval(credit.sum().item(), n)),
        "mean_margin": (chosen - rejected).mean().item(),
        **length_figures(list(zip(credit.tolist(), chosen_lengths, rejected_lengths))),
    }
