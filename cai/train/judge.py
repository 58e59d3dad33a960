"""`cai train judge`: a generative judge fine-tuned on labeled pairs (human labels, or an API judge's
`label_prob`) in exactly the prompt the compare stage asks (compare.judge_messages with its answer
instruction, the model's chat template with the assistant's turn opened, as the vLLM backend renders
it), so the trained folder is a judge any pipeline can name.

Each pair is asked in both orders, the better answer shown as (A) and as (B), under one comparison
principle of `judge.constitution` drawn per pair (seeded); the loss is Bradley-Terry on the logits of
the two option letters at the answer position (losses.judge_choice_loss), with a small NLL of the
right letter over the whole vocabulary. Training on both orders is what removes a position bias: a
judge that always answers (A) is right half the time and no better.

Both orders share every token up to the first answer (conversation, question, "(A)\\n<response_a>\\n"):
they go in one packed row that holds that prefix once (data.collate_groups), and the option logits are
read at each order's last token. A pair longer than max_length is cut to fit (fit_prompt): answers
capped, the conversation cut from the left; the counts are reported.

Before and after training, the held-out pairs are judged in-process the way `cai eval-judge` judges
them (option log-probs normalised over A/B, swap-averaged) and measured by eval-judge's own figures:
accuracy swap-averaged and per order, position consistency, with Wilson intervals, and the accuracy on
chosen-longer and chosen-shorter pairs (their mean: the length-balanced accuracy).

Against the length shortcut: each pair's loss carries a weight (its data.train file's, made
length-balanced with `length_balance`), and `length_coef` adds |corr(z_chosen - z_rejected, token-length
difference)| over the batch and the `length_window` pairs before it (losses.length_correlation_penalty).

OUTPUT/
  checkpoints/, metrics.jsonl, curves.png
  judge-before.json   the starting model's held-out figures, written before the first step
  final/              the judge; final/judge.json: held-out figures before and after, what was cut
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.core.files import content_hash
from cai.core.seeding import rng
from cai.generate import constitution as constitutions
from cai.generate import feedback
from cai.generate.backends.local_vllm import prompt_ids
from cai.generate.stages.compare import ANSWER_INSTRUCTION, OPTIONS, conversation_text, draw_distinct, judge_messages
from cai.judge.eval_judge import agreement_figures
from cai.train import data, loop, runtime
from cai.train.config import TrainConfig
from cai.train.losses import CorrelationWindow, judge_choice_loss, pairwise_credit, pearson_correlation

JUDGE_FILE = "judge.json"
BEFORE_FILE = "judge-before.json"
FIGURES = ("accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency")
# the length split (None when one side has no pair): in the summary line, and in metrics.jsonl when known
SPLIT_FIGURES = ("length_balanced_accuracy", "accuracy_chosen_longer", "accuracy_chosen_shorter")
DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[2] / "constitutions" / "harmless.yaml"


@dataclass(frozen=True)
class Judged:
    """A labeled pair as the judge is asked it: the prompt's tokens with the better answer shown first
    (A) and second (B), the target P(better answer wins), and the compare-stage row eval_judge reads."""

    orders: tuple[list[int], list[int]]
    target: float
    row: dict[str, Any]
    length_diff: int = 0  # tokens of the shown chosen answer minus the shown rejected one
    weight: float = 1.0  # in the loss: its file's weight, length-balanced with judge.length_balance


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint, as a kill there would."""
    from transformers import AutoModelForCausalLM

    options = config.judge
    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))

    # --- constitution, letters, data: validated before anything is written
    constitution = load_constitution(config)
    letters = torch.tensor([option_token(tokenizer, letter, config) for letter in OPTIONS])
    pairs, eval_pairs = data.preference_splits(config)
    if options.soft_labels:
        data.require_column(config, pairs, "label_prob", "judge.soft_labels")
    train_set, train_counts = encode_pairs(tokenizer, pairs, constitution, config)
    eval_set, eval_counts = encode_pairs(tokenizer, eval_pairs, constitution, config)
    if not train_set:
        raise InputError(
            str(config.train_data),
            None,
            f"no pair with two different answers fits the judge prompt in max_length {config.max_length}",
        )
    for name, counts in (("training", train_counts), ("held-out", eval_counts)):
        if counts["conversation_cut"] or counts["answers_capped"] or counts["left_out"] or counts["identical"]:
            runtime.note(
                acc,
                f"{name} pairs: {counts['conversation_cut']} conversations cut from the left and {counts['answers_capped']} with answers capped "
                f"to fit max_length {config.max_length}, {counts['left_out']} left out (too long even so), {counts['identical']} with identical answers",
            )

    weights, weighting = data.pair_weights(
        [j.weight for j in train_set], [j.length_diff for j in train_set], options.length_balance
    )
    train_set = [replace(j, weight=w) for j, w in zip(train_set, weights)]
    if options.length_balance or config.data_files()[1:]:
        runtime.note(acc, data.weights_line(weighting))

    resume = runtime.prepare_output(config, acc)
    training = loop.start(
        config,
        acc,
        tokenizer,
        resume,
        [len(j.orders[0]) + len(j.orders[1]) for j in train_set],
        AutoModelForCausalLM,
    )
    model = training.model
    pad_id = data.pad_id(tokenizer)
    letters = letters.to(acc.device)
    window = CorrelationWindow(options.length_window)

    def batch_values(items: list[Judged]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = option_logits(model, items, pad_id, acc.device)  # pair i's order (A) at 2i, order (B) at 2i + 1
        right, wrong = letters.repeat(len(items)), letters.flip(0).repeat(len(items))
        target = torch.tensor([j.target for j in items], device=acc.device).repeat_interleave(2)
        weight = torch.tensor([j.weight for j in items], device=acc.device).repeat_interleave(2)
        loss = (judge_choice_loss(logits, right, wrong, target, options.lm_coef) * weight).mean()
        # z_chosen - z_rejected per pair, the two orders averaged: the preference without its position part
        preference = (logits.gather(1, right[:, None]) - logits.gather(1, wrong[:, None])).view(-1, 2).mean(1)
        length_diff = torch.tensor([float(j.length_diff) for j in items], device=acc.device)
        if options.length_coef:  # the figure over the window: over a batch of 2 pairs it is +-1
            term, correlation = window.penalty(preference, length_diff, options.length_coef)
            loss = loss + term
        else:
            correlation = pearson_correlation(preference, length_diff).item()
        probs = logits.softmax(-1)
        p_right = probs.gather(1, right[:, None])[:, 0] / probs[:, letters].sum(-1)
        return loss, {
            "loss": loss.item(),
            "accuracy": pairwise_credit(p_right, 0.5).mean().item(),  # per order
            "p_right": p_right.mean().item(),
            "letter_mass": probs[:, letters].sum(-1).mean().item(),  # P(A) + P(B) over the vocabulary
            "length_correlation": correlation,
        }

    reports: dict[str, dict[str, Any]] = {}

    def evaluate() -> dict[str, float]:
        report, loss = held_out(
            model,
            eval_set,
            eval_counts["identical"],
            letters,
            pad_id,
            acc.device,
            config.eval_batch_size or config.batch_size,
            options.lm_coef,
        )
        # a fresh run's first evaluation: the starting model's
        if resume is None and "after" not in reports and acc.is_main_process:
            write_atomic(config.output_dir / BEFORE_FILE, json.dumps(report, indent=2) + "\n")
        reports["after"] = report
        split = {key: report[key] for key in SPLIT_FIGURES if report[key] is not None}
        return {"loss": loss, **{key: report[key] for key in FIGURES}, **split}

    result = loop.fit(
        training,
        lambda indexes: batch_values([train_set[i] for i in indexes]),
        evaluate if eval_set else None,
        stop_after,
    )
    if result is None:
        return config.output_dir / "final"
    # resumed from the last step's checkpoint: the loop had nothing left to evaluate
    if eval_set and "after" not in reports:
        evaluate()
    final = loop.publish(config, acc, model, tokenizer)
    if acc.is_main_process:
        before_file = config.output_dir / BEFORE_FILE
        summary = {
            "model": config.model,
            "constitution": str(config.judge.constitution or DEFAULT_CONSTITUTION),
            "before": json.loads(before_file.read_text()) if eval_set else None,
            "after": reports.get("after"),
            "train_pairs": {"used": len(train_set), **train_counts},
            "train_weights": weighting,
            "eval_pairs": {"used": len(eval_set), **eval_counts},
        }
        write_atomic(final / JUDGE_FILE, json.dumps(summary, indent=2) + "\n")
        if eval_set:
            runtime.note(acc, summary_line(summary["before"], summary["after"]))
    return final


def summary_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    shown = ", ".join(
        f"{key.replace('_', ' ')} {_figure(before[key])} -> {_figure(after[key])}" for key in FIGURES + SPLIT_FIGURES
    )
    return f"judge on {after['n']} held-out pairs, before -> after: {shown}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def load_constitution(config: TrainConfig) -> constitutions.Constitution:
    path = config.judge.constitution
    if path is None:
        if not DEFAULT_CONSTITUTION.exists():
            raise InputError(
                str(config.file),
                "judge.constitution",
                f"none given, and the default {DEFAULT_CONSTITUTION} is not there: name a constitution",
            )
        path = DEFAULT_CONSTITUTION
    constitution = constitutions.load(path)
    if not any(p.comparison for p in constitution.principles):
        raise InputError(str(config.file), "judge.constitution", f"{path} has no principle with a comparison question")
    return constitution


def option_token(tokenizer, letter: str, config: TrainConfig) -> int:
    """The token the judge writes for an option: the one the vLLM backend reads its log-prob at."""
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(
            str(config.file),
            "model",
            f"the option {letter!r} is {len(ids)} tokens in this tokenizer: the judge answers with one token",
        )
    return ids[0]


# ----------------------------------------------------------------------------- prompts


def encode_pairs(tokenizer, pairs: list[data.Pair], constitution, config: TrainConfig) -> tuple[list[Judged], Counter]:
    """Each pair as the judge prompt in both orders, fitted to max_length. Counts of what was cut,
    left out, or had two equal answers (the compare stage does not judge those either)."""
    counts = Counter(conversation_cut=0, answers_capped=0, left_out=0, identical=0)
    out = []
    for index, pair in enumerate(pairs):
        chosen, rejected = pair.chosen[-1]["content"], pair.rejected[-1]["content"]
        if chosen.strip() == rejected.strip():
            counts["identical"] += 1
            continue
        [principle] = draw_distinct(
            constitution, 1, rng(config.seed, "judge", content_hash([pair.prompt, chosen, rejected]))
        )
        fitted = fit_prompt(tokenizer, pair.prompt, principle, chosen, rejected, config.max_length)
        if fitted is None:
            counts["left_out"] += 1
            continue
        messages, shown_chosen, shown_rejected, cut = fitted
        counts.update(cut)
        orders = (
            judge_prompt(tokenizer, messages, principle, shown_chosen, shown_rejected),
            judge_prompt(tokenizer, messages, principle, shown_rejected, shown_chosen),
        )
        target = pair.label_prob if config.judge.soft_labels and pair.label_prob is not None else 1.0
        length_diff = len(tokenizer.encode(shown_chosen, add_special_tokens=False)) - len(
            tokenizer.encode(shown_rejected, add_special_tokens=False)
        )
        row = {
            "id": f"pair-{index + 1}",
            "messages": pair.prompt,
            "response": chosen,
            "responses": [chosen, rejected],
            "principle_id": principle.id,
        }
        out.append(Judged(orders, target, row, length_diff, pair.weight))
    return out, counts


def judge_prompt(tokenizer, messages: data.Messages, principle, first: str, second: str) -> list[int]:
    """The compare stage's question, as the vLLM backend hands it to the engine."""
    return prompt_ids(tokenizer, judge_messages(messages, principle, first, second, ANSWER_INSTRUCTION))


def fit_prompt(tokenizer, messages: data.Messages, principle, chosen: str, rejected: str, max_length: int):
    """(messages, chosen, rejected, what was cut) whose judge prompt fits max_length in both orders, or
    None when even the prompt's fixed part nearly fills it. The answers are what is judged: each keeps up
    to half of what is left once the conversation keeps a third (less when the other answer is short);
    the conversation keeps the rest, its latest turns (whole turns dropped from the left, then the
    oldest kept turn cut from its start)."""

    def longest(m, c, r) -> int:
        return max(len(judge_prompt(tokenizer, m, principle, c, r)), len(judge_prompt(tokenizer, m, principle, r, c)))

    if longest(messages, chosen, rejected) <= max_length:
        return messages, chosen, rejected, ()
    room = max_length - longest([], "", "")
    if room < 32:
        return None
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    conversation, a, b = len(encode(conversation_text(messages))), encode(chosen), encode(rejected)
    cap_a, cap_b = share(len(a), len(b), room - min(conversation, room // 3))
    cut = ("answers_capped",) if cap_a < len(a) or cap_b < len(b) else ()
    shown_a = chosen if cap_a >= len(a) else tokenizer.decode(a[:cap_a])
    shown_b = rejected if cap_b >= len(b) else tokenizer.decode(b[:cap_b])
    conversation_room = room - min(cap_a, len(a)) - min(cap_b, len(b))
    for _ in range(4):  # tokens merge differently across the cuts: take off what still overflows and retry
        kept, cut_conversation = cut_left(tokenizer, messages, conversation_room)
        over = longest(kept, shown_a, shown_b) - max_length
        if over <= 0:
            return kept, shown_a, shown_b, cut + (("conversation_cut",) if cut_conversation else ())
        conversation_room -= over
        if conversation_room <= 0:
            return None
    return None


def share(a: int, b: int, room: int) -> tuple[int, int]:
    """Token caps for two answers of lengths a and b within `room`: both whole when they fit, else the
    shorter whole if it takes at most half, and the longer what is left; else half each."""
    if a + b <= room:
        return a, b
    half = room // 2
    if a <= half:
        return a, room - a
    if b <= half:
        return room - b, b
    return half, room - half


def cut_left(tokenizer, messages: data.Messages, room: int) -> tuple[data.Messages, bool]:
    """The latest turns whose conversation text is at most `room` tokens; the last turn alone cut from
    its start when it is longer. Returns (messages, whether anything was cut)."""
    count = lambda m: len(tokenizer.encode(conversation_text(m), add_special_tokens=False))
    for start in range(len(messages)):
        if count(messages[start:]) <= room:
            return messages[start:], start > 0
    last = messages[-1]
    content = tokenizer.encode(last["content"], add_special_tokens=False)
    keep = max(room - count([{**last, "content": ""}]), 0)
    return [{**last, "content": tokenizer.decode(content[len(content) - keep :]) if keep else ""}], True


# ----------------------------------------------------------------------------- the model's choice


def option_logits(model, items: list[Judged], pad_id: int, device) -> torch.Tensor:
    """Next-token logits [2N, V] at the end of each prompt: pair i's order (A) at 2i, order (B) at 2i + 1.
    Both orders of a pair go in one packed row that holds their shared beginning once; only the rows'
    answer positions go through the output layer (logits_to_keep), not the whole vocabulary at every token."""
    batch = data.collate_groups([list(j.orders) for j in items], pad_id)
    keep = torch.unique(batch["end"])  # sorted
    logits = model(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        logits_to_keep=keep.to(device),
        attention_mask=data.additive_mask(batch["attention_mask"].to(device), next(model.parameters()).dtype),
    ).logits
    return logits[batch["row"].to(device), torch.searchsorted(keep, batch["end"]).to(device)].float()


@torch.no_grad()
def held_out(
    model,
    items: list[Judged],
    identical: int,
    letters: torch.Tensor,
    pad_id: int,
    device,
    batch_size: int,
    lm_coef: float,
) -> tuple[dict[str, Any], float]:
    """eval_judge's figures of the model judging `items` as the compare stage would (each order's option
    log-probs normalised over A and B by feedback.normalise, the two orders swap-averaged), and the mean loss."""
    model.eval()
    rows, total = [{"pairs": []} for _ in range(identical)], 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        logits = option_logits(model, chunk, pad_id, device)
        target = torch.tensor([j.target for j in chunk], device=device).repeat_interleave(2)
        total += (
            judge_choice_loss(logits, letters.repeat(len(chunk)), letters.flip(0).repeat(len(chunk)), target, lm_coef)
            .sum()
            .item()
        )
        logprobs = logits.log_softmax(-1)[:, letters].tolist()
        for k, item in enumerate(chunk):
            shown_first = feedback.normalise(dict(zip(OPTIONS, logprobs[2 * k])), OPTIONS)["A"]
            shown_second = feedback.normalise(dict(zip(OPTIONS, logprobs[2 * k + 1])), OPTIONS)["B"]
            votes = [
                {"principle_id": item.row["principle_id"], "swapped": swapped, "p_first": p, "method": "logprobs"}
                for swapped, p in ((False, shown_first), (True, shown_second))
            ]
            rows.append(
                {
                    **item.row,
                    "pairs": [
                        {"answers": [0, 1], "votes": votes, "p_first": feedback.swap_average(shown_first, shown_second)}
                    ],
                }
            )
    model.train()
    return agreement_figures(rows), total / max(2 * len(items), 1)
