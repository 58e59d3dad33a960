"""Loss masks from the chat template, collation, preference loading in every accepted format, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.core.errors import InputError
from cai.train.data import (
    Batches,
    collate,
    encode,
    encode_pairs,
    group_pairs,
    load_preferences,
    load_sft,
    split_eval,
    truncate,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I pick a lock?"},
    {"role": "assistant", "content": "Ask a locksmith."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "It is their job."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def masked_text(tokenizer, e) -> str:
    return tokenizer.decode([t for t, m in zip(e.input_ids, e.mask) if m])


def test_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    e = encode(tokenizer, CONVERSATION)
    assert len(e.input_ids) == len(e.mask)
    assert tokenizer.decode(e.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # each assistant turn's content and its end-of-turn, without the `<|im_start|>assistant\n` header
    assert masked_text(tokenizer, e) == "Ask a locksmith.<|im_end|>\nIt is their job.<|im_end|>\n"
    # the masked tokens are two contiguous runs
    runs = sum(1 for i, m in enumerate(e.mask) if m and (i == 0 or not e.mask[i - 1]))
    assert runs == 2


def test_mask_from_train_from_covers_only_the_answer(tokenizer) -> None:
    e = encode(tokenizer, CONVERSATION, train_from=4)
    assert masked_text(tokenizer, e) == "It is their job.<|im_end|>\n"


def test_truncate_drops_examples_without_answer_tokens(tokenizer) -> None:
    e = encode(tokenizer, CONVERSATION, train_from=4)
    first_answer_token = e.mask.index(1)
    assert truncate(e, first_answer_token) is None
    kept = truncate(e, first_answer_token + 2)
    assert kept is not None and len(kept.input_ids) == first_answer_token + 2 and sum(kept.mask) == 2


def test_collate_pads_right(tokenizer) -> None:
    a, b = encode(tokenizer, CONVERSATION[:3]), encode(tokenizer, CONVERSATION)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum().item() == len(a.input_ids)
    assert batch["mask"][0].tolist() == a.mask + [0] * (len(b.input_ids) - len(a.input_ids))


PAIR = {
    "prompt": [{"role": "user", "content": "Hi?"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_cai_jsonl_and_datasets_folder_agree(tmp_path: Path) -> None:
    from datasets import load_dataset

    records = [
        {**PAIR, "label_prob": 0.9, "margin": 2.2, "group_id": "g1", "principle_ids": ["harm"]},
        {
            **PAIR,
            "chosen": [{"role": "assistant", "content": "Hey."}],
            "label_prob": 0.7,
            "margin": 0.85,
            "group_id": "g1",
            "principle_ids": [],
        },
    ]
    jsonl = write_jsonl(tmp_path / "preferences.jsonl", records)
    folder = tmp_path / "preferences"
    load_dataset("json", data_files=str(jsonl), split="train").save_to_disk(str(folder))
    from_jsonl, from_folder = load_preferences(jsonl), load_preferences(folder)
    assert from_jsonl == from_folder
    assert [(p.label_prob, p.margin, p.group) for p in from_jsonl] == [(0.9, 2.2, "g1"), (0.7, 0.85, "g1")]


def test_load_hh_transcripts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}],
    )
    [pair] = load_preferences(path)
    assert pair.prompt == [{"role": "user", "content": "Hi?"}]
    assert pair.chosen == [{"role": "assistant", "content": "Hello."}]
    assert pair.rejected == [{"role": "assistant", "content": "Go away."}]
    assert pair.label_prob is None


@pytest.mark.parametrize(
    "record, where",
    [
        ({**PAIR, "label_prob": 1.5}, ":1: label_prob: "),
        ({**PAIR, "chosen": [{"role": "user", "content": "x"}]}, ":1: chosen: "),
        ({**PAIR, "rejected": []}, ":1: rejected: "),
        ({k: v for k, v in PAIR.items() if k != "prompt"}, ":1: <root>: "),
    ],
)
def test_bad_preference_records(tmp_path: Path, record: dict, where: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(InputError) as info:
        load_preferences(path)
    assert info.value.render().startswith(f"{path}{where}")


def test_nan_label_prob_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIR)[:-1] + ', "margin": NaN}\n')
    with pytest.raises(InputError, match="finite"):
        load_preferences(path)


def test_load_sft_requires_an_assistant_turn(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATION, "id": "x"}])
    assert load_sft(good) == [CONVERSATION]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION[:2]}])
    with pytest.raises(InputError, match="no assistant message"):
        load_sft(bad)


def test_group_pairs_scores_each_answer_once(tokenizer) -> None:
    from cai.train.data import Pair

    a, b, c = ([{"role": "assistant", "content": t}] for t in ("A.", "B.", "C."))
    prompt = [{"role": "user", "content": "Q?"}]
    pairs = [
        Pair(prompt, a, b, 0.9, None, "g"),
        Pair(prompt, a, c, 0.8, None, "g"),
        Pair(prompt, c, b, 0.6, None, "g"),
        Pair(prompt, a, b, None, None, "h"),
    ]
    groups, dropped = group_pairs(tokenizer, pairs, max_length=512)
    assert dropped == 0 and len(groups) == 2
    assert len(groups[0].answers) == 3  # three pairs of K = 3 answers: three forward passes, not six
    assert groups[0].pairs == [(0, 1, 0.9, None), (0, 2, 0.8, None), (2, 1, 0.6, None)]


def test_encode_pairs_masks_answers(tokenizer) -> None:
    from cai.train.data import Pair

    [e], dropped = encode_pairs(tokenizer, [Pair(PAIR["prompt"], PAIR["chosen"], PAIR["rejected"])], max_length=512)
    assert dropped == 0
    assert masked_text(tokenizer, e.chosen) == "Hello.<|im_end|>\n"
    assert masked_text(tokenizer, e.rejected) == "Go away.<|im_end|>\n"


def test_split_eval_keeps_groups_together() -> None:
    items = list(range(20))
    groups = [f"g{i // 4}" for i in items]
    train, held = split_eval(items, groups, 0.2, seed=1)
    assert len(held) == 4 and len({groups[i] for i in held}) == 1
    assert sorted(train + held) == items
    assert split_eval(items, groups, 0.2, seed=1) == (train, held)


def test_batches_are_a_function_of_seed_and_position() -> None:
    lengths = [i % 7 + 1 for i in range(50)]
    batches = Batches(lengths, batch_size=4, seed=3, bucket=True)
    assert batches.per_epoch == 13
    epoch0 = [batches(i) for i in range(13)]
    assert sorted(i for b in epoch0 for i in b) == list(range(50))  # every example once per epoch
    assert Batches(lengths, 4, seed=3, bucket=True)(14) == batches(14)  # a fresh object, same batch
    assert [batches(13 + i) for i in range(13)] != epoch0  # a new order each epoch
    # two processes read disjoint batches
    r0, r1 = Batches(lengths, 4, 3, True, rank=0, world_size=2), Batches(lengths, 4, 3, True, rank=1, world_size=2)
    assert not {i for p in range(6) for i in r0(p)} & {i for p in range(6) for i in r1(p)}
