"""Training data: records in (SFT `messages`, preference pairs), token ids and loss masks out, and the
batches each step reads.

Loss masks come from the chat template itself: the tokens of assistant turn i are the characters
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]). That works with
any template that renders conversations prefix-consistently, `{% generation %}` support or not.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from cai.core.errors import InputError
from cai.core.files import canonical_json, content_hash, jsonl_records, read_text, validate
from cai.generate import importers
from cai.train import packing
from cai.train.config import TrainConfig
from cai.train.losses import length_balance_weights, unit_mean

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Pair:
    prompt: Messages
    chosen: Messages
    rejected: Messages
    label_prob: float | None = None  # P(chosen is better) from the judge
    margin: float | None = None
    group: str = ""  # pairs of one prompt's K answers share it (the `group_id` column)
    weight: float = 1.0  # how much the pair counts in the loss: its data.train file's weight


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) from a HF `datasets` folder (save_to_disk) or a JSONL file."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(str(path), None, f"not a HF datasets folder: {exc}") from None
        if isinstance(dataset, DatasetDict):
            if "train" not in dataset:
                raise InputError(
                    str(path), None, f"a DatasetDict without a 'train' split (splits: {', '.join(dataset)})"
                )
            dataset = dataset["train"]
        for index, row in enumerate(dataset, start=1):
            # Arrow fills a column missing from some rows with None: absent, not null.
            yield index, {k: v for k, v in row.items() if v is not None}
    else:
        yield from jsonl_records(path, read_text(path))


def load_sft(path: Path, limit: int | None = None, skip: int = 0) -> list[Messages]:
    """`messages` records (a cai run's datasets/sft folder or sft.jsonl), each with an assistant turn;
    the first `skip` records passed over."""
    file = str(path)
    out = []
    for line, record in itertools.islice(_records(path), skip, None):
        validate(record, "train_sft_record", file, line)
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise InputError(file, "messages", "no assistant message to train on", line=line)
        out.append([{"role": m["role"], "content": m["content"]} for m in record["messages"]])
        if limit is not None and len(out) == limit:
            break
    if not out:
        raise InputError(file, None, f"no records after the {skip} skipped" if skip else "no records")
    return out


def load_preferences(path: Path, limit: int | None = None, skip: int = 0) -> list[Pair]:
    """Preference pairs from a cai run's datasets/preferences (folder or .jsonl: TRL's conversational
    format with optional `label_prob`, `margin`, `group_id`) or HH-RLHF style `chosen`/`rejected`
    transcripts; the first `skip` records passed over (a held-out slice of the training file)."""
    if path.is_file() and _is_transcript_file(path):
        return [
            Pair(
                prompt=p["context"],
                chosen=[_assistant(p["chosen"])],
                rejected=[_assistant(p["rejected"])],
                group=content_hash(p["context"]),
            )
            for p in importers.load_pairs(path, limit, skip)
        ]
    file = str(path)
    pairs = []
    for line, record in itertools.islice(_records(path), skip, None):
        if _is_unpaired(record):
            raise InputError(
                file,
                "completion",
                "an unpaired row (prompt, completion, label): pairs (chosen, rejected) are needed here; "
                "only `cai train dpo` with dpo.loss_type kto trains on unpaired answers",
                line=line,
            )
        pairs.append(_pair(record, file, line))
        if limit is not None and len(pairs) == limit:
            break
    if not pairs:
        raise InputError(file, None, f"no pairs after the {skip} skipped" if skip else "no pairs")
    return pairs


def _pair(record: Any, file: str, line: int) -> Pair:
    validate(record, "train_preference", file, line)
    for key in ("chosen", "rejected"):
        if record[key][-1]["role"] != "assistant":
            raise InputError(file, key, "must end with an assistant message", line=line)
    for key in ("label_prob", "margin"):
        if key in record and not math.isfinite(record[key]):
            raise InputError(file, key, f"must be a finite number, got {record[key]}", line=line)
    prompt = _plain(record["prompt"])
    return Pair(
        prompt=prompt,
        chosen=_plain(record["chosen"]),
        rejected=_plain(record["rejected"]),
        label_prob=record.get("label_prob"),
        margin=record.get("margin"),
        group=str(record["group_id"]) if "group_id" in record else content_hash(prompt),
    )


def _is_unpaired(record: Any) -> bool:
    """TRL's unpaired preference format: `completion` and `label` where a pair has `chosen` and `rejected`."""
    return isinstance(record, dict) and "completion" in record and "chosen" not in record


@dataclass(frozen=True)
class Example:
    """One answer labelled desirable or not, without a pair (KTO's data)."""

    prompt: Messages
    completion: Messages
    label: bool
    group: str = ""  # the prompt's identity: KTO's KL estimate pairs a prompt with another prompt's answer


def unpair(pairs: list[Pair]) -> list[Example]:
    """Each pair as two examples: its chosen answer desirable, its rejected one not."""
    return [
        Example(p.prompt, answer, label, p.group)
        for p in pairs
        for answer, label in ((p.chosen, True), (p.rejected, False))
    ]


def load_examples(path: Path, limit: int | None = None, skip: int = 0) -> list[Example]:
    """Answers labelled desirable or not: rows in TRL's unpaired preference format (conversational `prompt`
    and `completion`, bool `label`, optional `group_id`), or preference pairs in any format
    `load_preferences` reads, each pair giving two examples (`unpair`). `limit` and `skip` count records."""
    if path.is_file() and _is_transcript_file(path):
        return unpair(load_preferences(path, limit, skip))
    file = str(path)
    examples, records = [], 0
    for line, record in itertools.islice(_records(path), skip, None):
        if _is_unpaired(record):
            validate(record, "train_unpaired", file, line)
            if record["completion"][-1]["role"] != "assistant":
                raise InputError(file, "completion", "must end with an assistant message", line=line)
            prompt = _plain(record["prompt"])
            group = str(record["group_id"]) if "group_id" in record else content_hash(prompt)
            examples.append(Example(prompt, _plain(record["completion"]), record["label"], group))
        else:
            examples += unpair([_pair(record, file, line)])
        records += 1
        if limit is not None and records == limit:
            break
    if not examples:
        raise InputError(file, None, f"no records after the {skip} skipped" if skip else "no records")
    return examples


def _is_transcript_file(path: Path) -> bool:
    for _, record in jsonl_records(path, read_text(path)):
        return isinstance(record, dict) and isinstance(record.get("chosen"), str) and "prompt" not in record
    return False


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _plain(messages: list[dict[str, Any]]) -> Messages:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def preference_splits(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """The training pairs (the first `limit` of each data.train file, each pair with its file's weight)
    and the held-out ones: `data.eval` from `eval_skip` on, else a seeded `eval_fraction` of the prompts
    (all of a prompt's pairs on one side)."""
    pairs = [
        replace(pair, weight=source.weight) if source.weight != 1.0 else pair
        for source in config.data_files()
        for pair in load_preferences(source.path, config.limit)
    ]
    if config.eval_data is not None:
        return pairs, load_preferences(config.eval_data, skip=config.eval_skip)
    return split_eval(pairs, [p.group for p in pairs], config.eval_fraction, config.seed)


def example_splits(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """`preference_splits` for unpaired examples (`load_examples`): a seeded share of the prompts held out."""
    examples = load_examples(config.train_data, config.limit)
    if config.eval_data is not None:
        return examples, load_examples(config.eval_data, skip=config.eval_skip)
    return split_eval(examples, [e.group for e in examples], config.eval_fraction, config.seed)


def require_column(config: TrainConfig, pairs: list[Pair], column: str, option: str) -> None:
    """An option that trains on a per-pair column (`label_prob`, `margin`) needs it on every pair."""
    if any(getattr(p, column) is None for p in pairs):
        raise InputError(str(config.train_data), column, f"{option} needs a {column} on every pair")


def split_eval(items: list, groups: list[str], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded `fraction` of the groups (never part of a group: no prompt leaks into eval)."""
    if fraction <= 0:
        return items, []
    distinct = sorted(set(groups))
    random.Random(seed).shuffle(distinct)
    held = set(distinct[: max(1, round(fraction * len(distinct)))]) if len(distinct) > 1 else set()
    train = [x for x, g in zip(items, groups) if g not in held]
    return train, [x for x, g in zip(items, groups) if g in held]


# ----------------------------------------------------------------------------- tokens and masks


class TemplateError(Exception):
    """The chat template does not render conversations prefix-consistently."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 on the tokens the loss counts (assistant turns at or after train_from)


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, messages: Messages, train_from: int = 0) -> Encoded:
    """Token ids of the rendered conversation, and a mask that is 1 exactly on the tokens of the
    assistant turns at index >= train_from (each turn's header excluded, its end-of-turn included)."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if i < train_from or message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise TemplateError(f"the chat template does not render turn {i} as a prefix of the whole conversation")
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoding["offset_mapping"]]
    return Encoded(list(encoding["input_ids"]), mask)


def truncate(e: Encoded, max_length: int) -> Encoded | None:
    """Keep the first max_length tokens; None when no trained token is left to predict."""
    ids, mask = e.input_ids[:max_length], e.mask[:max_length]
    return Encoded(ids, mask) if any(mask[1:]) else None


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and loss `mask`."""
    return {
        "input_ids": pad([e.input_ids for e in encoded], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in encoded], 0),
        "mask": pad([e.mask for e in encoded], 0),
    }


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------- preference pairs as tokens


@dataclass(frozen=True)
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    label_prob: float | None


def encode_pairs(tokenizer, pairs: list[Pair], max_length: int) -> tuple[list[EncodedPair], int]:
    """Prompt + answer, the loss mask on the answer only; (pairs kept, pairs left with no answer token)."""
    out, dropped = [], 0
    for p in pairs:
        chosen = truncate(encode(tokenizer, p.prompt + p.chosen, train_from=len(p.prompt)), max_length)
        rejected = truncate(encode(tokenizer, p.prompt + p.rejected, train_from=len(p.prompt)), max_length)
        if chosen is None or rejected is None:
            dropped += 1
            continue
        out.append(EncodedPair(chosen, rejected, p.label_prob))
    return out, dropped


@dataclass(frozen=True)
class EncodedExample:
    encoded: Encoded  # prompt + answer, the loss mask on the answer
    label: bool
    group: str

    @property
    def answer_start(self) -> int:
        """The position of the answer's first trained token: everything before it is the prompt."""
        return self.encoded.mask.index(1)


def encode_examples(tokenizer, examples: list[Example], max_length: int) -> tuple[list[EncodedExample], int]:
    """`encode_pairs` for unpaired examples: (examples kept, examples left with no answer token)."""
    out, dropped = [], 0
    for e in examples:
        encoded = truncate(encode(tokenizer, e.prompt + e.completion, train_from=len(e.prompt)), max_length)
        if encoded is None:
            dropped += 1
            continue
        out.append(EncodedExample(encoded, e.label, e.group))
    return out, dropped


def swap_answer(prompt_of: EncodedExample, answer_of: EncodedExample, max_length: int) -> Encoded:
    """The prompt of one example followed by the answer of another (KTO's mismatched pair), as token ids:
    TRL's KTOTrainer also joins prompt and completion ids. Always keeps an answer token: the prompt is
    shorter than max_length, since its own answer's first token fitted."""
    n, k = prompt_of.answer_start, answer_of.answer_start
    ids = prompt_of.encoded.input_ids[:n] + answer_of.encoded.input_ids[k:]
    mask = [0] * n + answer_of.encoded.mask[k:]
    return Encoded(ids[:max_length], mask[:max_length])


def kl_partners(groups: list[str]) -> list[int | None]:
    """For each example of a batch, the one whose answer it is paired with for KTO's KL estimate: the one
    before it (the last for the first), TRL's shift by one, or the nearest earlier one whose prompt (group)
    differs, so that the pair is mismatched; None where every other example has the same prompt."""
    n = len(groups)
    return [next(((i - s) % n for s in range(1, n) if groups[(i - s) % n] != groups[i]), None) for i in range(n)]


def shared_prompt(pair: EncodedPair) -> int:
    """How many leading tokens chosen and rejected share before either's first trained token."""
    first_trained = min(e.mask.index(1) for e in (pair.chosen, pair.rejected))
    n = 0
    while n < first_trained and pair.chosen.input_ids[n] == pair.rejected.input_ids[n]:
        n += 1
    return n


def packed_length(pair: EncodedPair) -> int:
    """A pair's tokens in a packed row: its shared prompt once, then both answers."""
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids) - shared_prompt(pair)


def pack(rows: list[tuple[int, list[list[int]]]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Rows that each hold the n leading tokens their sequences share once, then every sequence's
    tokens after them: [shared, rest of sequence 1, rest of sequence 2, ..., pads]. Each sequence sits
    at the positions it has on its own and attends to the shared part and to itself only, so one forward
    pass computes every sequence as if alone, the shared part (the prompt) once.

    `rows` are (n, sequences) with each sequence's first n tokens equal. Returns `input_ids`,
    `position_ids` [B, T] and `attention_mask` [B, 1, T, T] (True where a token may attend), and for
    each row where each sequence's token n lands in it.
    """
    batch, starts = pack_groups([[row] for row in rows], pad_id)
    return batch, [groups[0][1] for groups in starts]


def pack_groups(
    rows: list[list[tuple[int, list[list[int]]]]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[list[tuple[int, list[int]]]]]:
    """`pack` with several groups (n, sequences) one after another in a row (padding-free batches of
    pairs): a sequence attends to its own group's shared part and to itself only. Returns `pack`'s
    tensors and, per row and group, (where the group starts, where each sequence's token n lands)."""
    ids, positions, groups, segments, starts = [], [], [], [], []
    for row in rows:
        row_ids, row_positions, row_groups, row_segments, row_starts = [], [], [], [], []
        for g, (n, sequences) in enumerate(row):
            offset = len(row_ids)
            row_ids += sequences[0][:n]
            row_positions += range(n)
            row_segments += [0] * n
            sequence_starts = []
            for k, sequence in enumerate(sequences, start=1):
                sequence_starts.append(len(row_ids))
                row_ids += sequence[n:]
                row_positions += range(n, len(sequence))
                row_segments += [k] * (len(sequence) - n)
            row_groups += [g] * (len(row_ids) - offset)
            row_starts.append((offset, sequence_starts))
        ids.append(row_ids)
        positions.append(row_positions)
        groups.append(row_groups)
        segments.append(row_segments)
        starts.append(row_starts)
    segment, group = pad(segments, -1), pad(groups, -1)  # pads: a group of their own
    causal = torch.ones(segment.shape[1], segment.shape[1], dtype=torch.bool).tril()
    same_group = group[:, None, :] == group[:, :, None]  # [B, query, key]
    sees = same_group & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
    return {
        "input_ids": pad(ids, pad_id),
        "position_ids": pad(positions, 0),
        "attention_mask": (causal & sees).unsqueeze(1),
    }, starts


def attention_mask(attention_mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [B, 1, T, T] mask (`pack`) in the form the model's attention takes: sdpa the boolean one
    (a quarter of the additive form's memory, which matters for a packed row of thousands of tokens),
    eager attention the additive one."""
    return additive_mask(attention_mask, dtype) if implementation == "eager" else attention_mask


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [B, 1, T, T] mask as the additive form: eager attention adds the mask to the scores,
    sdpa takes either form."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min
    )


def collate_pairs(pairs: list[EncodedPair], pad_id: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Each pair as one packed row holding its shared prompt once (`pack`): [prompt, chosen answer,
    rejected answer, pads]; one forward pass gives every sequence's log-probs with the prompt computed
    once (on HH-RLHF pairs the prompt is most of the tokens). With a `capacity` (`packing: true`), the
    pairs one after another in rows of at most that many tokens (packing.rows), with next to no pads.

    Returns `pack`'s tensors, and for each trained token of each sequence (mask 1, position >= 1, as
    a sequence's log-prob sums them): `row`, `source` (the position whose logits predict it), `token`, and
    `sequence` (i for pair i's chosen answer, B + i for its rejected one).
    """
    groups = [(shared_prompt(pair), [pair.chosen.input_ids, pair.rejected.input_ids]) for pair in pairs]
    if capacity is None:
        layout = [[b] for b in range(len(pairs))]
    else:
        layout = packing.rows([packed_length(pair) for pair in pairs], capacity)
    batch, starts = pack_groups([[groups[b] for b in row] for row in layout], pad_id)
    placed = {b: (r, g) for r, row in enumerate(layout) for g, b in enumerate(row)}
    row, source, token, sequence = [], [], [], []
    for b, ((n, _), pair) in enumerate(zip(groups, pairs)):
        r, g = placed[b]
        offset, sequence_starts = starts[r][g]
        for side, e in enumerate((pair.chosen, pair.rejected)):
            start = sequence_starts[side]  # where this answer's position n lands in the row
            for i in range(max(n, 1), len(e.input_ids)):
                if e.mask[i]:
                    row.append(r)
                    # the answer's first token is predicted from the prompt's last
                    source.append(start + i - 1 - n if i > n else offset + i - 1)
                    token.append(e.input_ids[i])
                    sequence.append(side * len(pairs) + b)
    return {
        **batch,
        "row": torch.tensor(row),
        "source": torch.tensor(source),
        "token": torch.tensor(token),
        "sequence": torch.tensor(sequence),
    }


def shared_prefix(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least its last token."""
    limit = min(len(s) for s in sequences) - 1
    n = 0
    while n < limit and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def group_length(sequences: list[list[int]]) -> int:
    """A group's tokens in a packed row: their shared prompt once, then each answer."""
    n = shared_prefix(sequences)
    return n + sum(len(s) - n for s in sequences)


def collate_groups(groups: list[list[list[int]]], pad_id: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Each group (one prompt's K answers, as full token sequences) as one packed row, the prompt once
    (`pack`); with a `capacity` (`packing: true`), the groups one after another in rows of at most that
    many tokens (packing.rows; a group longer than that gets a row of its own). Returns `pack`'s tensors
    and, for every sequence in order, its `row` and `end` (the row position of its last token, where a
    reward head reads it)."""
    shared = [(shared_prefix(sequences), sequences) for sequences in groups]
    if capacity is None:
        layout = [[b] for b in range(len(groups))]
    else:
        layout = packing.rows([group_length(sequences) for sequences in groups], capacity)
    batch, starts = pack_groups([[shared[b] for b in row] for row in layout], pad_id)
    placed = {b: (r, g) for r, row in enumerate(layout) for g, b in enumerate(row)}
    row, end = [], []
    for b, (n, sequences) in enumerate(shared):
        r, g = placed[b]
        for sequence, start in zip(sequences, starts[r][g][1]):
            row.append(r)
            end.append(start + len(sequence) - 1 - n)
    return {**batch, "row": torch.tensor(row), "end": torch.tensor(end)}


@dataclass(frozen=True)
class Group:
    """One prompt's distinct answers (each scored once) and the pairs among them."""

    answers: list[list[int]]
    pairs: list[tuple[int, int, float | None, float | None]]  # (chosen index, rejected index, label_prob, margin)
    weights: tuple[float, ...] = ()  # each pair's loss weight; () all 1

    def length_diffs(self) -> list[int]:
        """Each pair's token-length difference, chosen minus rejected (their shared prompt cancels)."""
        return [len(self.answers[c]) - len(self.answers[r]) for c, r, _, _ in self.pairs]

    @property
    def tokens(self) -> int:
        return sum(len(a) for a in self.answers)

    @property
    def packed_tokens(self) -> int:
        return group_length(self.answers)


def group_pairs(tokenizer, pairs: list[Pair], max_length: int) -> tuple[list[Group], int]:
    """Pairs with the same group -> one Group; pairs with an answer longer than max_length are left out
    (a reward read off a cut answer would score text the labeller never saw). Returns (groups, dropped)."""
    by_group: dict[str, tuple[dict[str, int], list[list[int]], list]] = {}
    weights: dict[str, list[float]] = {}
    dropped = 0
    for p in pairs:
        chosen_ids = encode(tokenizer, p.prompt + p.chosen).input_ids
        rejected_ids = encode(tokenizer, p.prompt + p.rejected).input_ids
        if len(chosen_ids) > max_length or len(rejected_ids) > max_length:
            dropped += 1
            continue
        index, answers, group_pairs_ = by_group.setdefault(p.group, ({}, [], []))
        slots = []
        for messages, ids in ((p.chosen, chosen_ids), (p.rejected, rejected_ids)):
            key = canonical_json([p.prompt, messages])
            if key not in index:
                index[key] = len(answers)
                answers.append(ids)
            slots.append(index[key])
        group_pairs_.append((slots[0], slots[1], p.label_prob, p.margin))
        weights.setdefault(p.group, []).append(p.weight)
    return [
        Group(answers, pairs_, tuple(weights[group]) if set(weights[group]) != {1.0} else ())
        for group, (_, answers, pairs_) in by_group.items()
    ], dropped


def pair_weights(weights: list[float], length_diffs: list[int], balance: bool) -> tuple[list[float], dict[str, Any]]:
    """Each training pair's loss weight, mean 1: its file's weight, made length-balanced with `balance`
    (losses.length_balance_weights); and what to print and record: per side (the chosen answer the
    longer, the shorter, equal lengths) the pairs and the weight they carry in total."""
    out = unit_mean(length_balance_weights(length_diffs, weights) if balance else list(weights))
    sides = {"chosen_longer": lambda d: d > 0, "chosen_shorter": lambda d: d < 0, "equal_length": lambda d: d == 0}
    summary = {
        side: {
            "pairs": sum(1 for d in length_diffs if test(d)),
            "total_weight": round(sum(w for w, d in zip(out, length_diffs) if test(d)), 6),
        }
        for side, test in sides.items()
    }
    return out, {"length_balance": balance, **summary}


def weights_line(summary: dict) -> str:
    """The training pairs' weights, once on the terminal."""
    sides = ", ".join(
        f"{summary[side]['pairs']} {side.replace('_', '-')} pairs weigh {summary[side]['total_weight']:.1f}"
        for side in ("chosen_longer", "chosen_shorter", "equal_length")
    )
    return f"pair weights ({'length-balanced' if summary['length_balance'] else 'by file'}): {sides} in total"


# ----------------------------------------------------------------------------- batches


class Batches:
    """The batches of every epoch as lists of item indexes, a pure function of (seed, epoch): a resumed
    run asks for batch number `position` and gets what the uninterrupted run got.

    Each process of a distributed run reads every world_size-th batch; all read the same number.
    With bucketing, items are sorted by length inside windows of 64 batches, then the batches are
    shuffled: little padding, yet no fixed order of lengths.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, bucket: bool = False, rank: int = 0, world_size: int = 1
    ):
        self.lengths, self.batch_size, self.seed, self.bucket = lengths, batch_size, seed, bucket
        self.rank, self.world_size = rank, world_size
        self.per_epoch = math.ceil(len(lengths) / batch_size) // world_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(lengths)} examples make no batch of {batch_size} on each of {world_size} processes")
        self._epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.bucket:
            window = self.batch_size * 64
            order = [
                i
                for w in range(0, len(order), window)
                for i in sorted(order[w : w + window], key=lambda i: -self.lengths[i])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.bucket:
            rng.shuffle(batches)
        return batches[self.rank :: self.world_size][: self.per_epoch]

    def __call__(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.plan(epoch)
        return self._plan[index]


class PackedBatches(Batches):
    """`Batches` for packed rows (`packing: true`): each batch is the items of `rows_per_batch` bins of
    at most `capacity` tokens (packing.best_fit_decreasing), bin after bin. Items are shuffled before the
    (stable) best-fit, so equal-length items change bins between epochs, and the bins are shuffled."""

    def __init__(
        self, lengths: list[int], capacity: int, rows_per_batch: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.lengths, self.capacity, self.rows_per_batch, self.seed = lengths, capacity, rows_per_batch, seed
        self.rank, self.world_size = rank, world_size
        # the number of bins depends on the lengths only, not on the epoch's order among equal lengths
        self.per_epoch = len(self.every_batch(0)) // world_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(lengths)} examples make no packed batch on each of {world_size} processes")
        self._epoch, self._plan = -1, []

    def every_batch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bins = packing.best_fit_decreasing(self.lengths, order, self.capacity)
        rng.shuffle(bins)
        return [
            [i for b in bins[start : start + self.rows_per_batch] for i in b]
            for start in range(0, len(bins), self.rows_per_batch)
        ]

    def plan(self, epoch: int) -> list[list[int]]:
        return self.every_batch(epoch)[self.rank :: self.world_size][: self.per_epoch]
