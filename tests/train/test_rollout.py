"""The prompt set an online trainer (and distillation's teacher) samples from: prompts that leave no
room for the answer are left out, and none fitting is an error naming max_length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from synthetic import one_process
from transformers import AutoTokenizer

from cai.core.errors import InputError
from cai.train.rollout import fitting_prompts


def test_prompts_without_room_for_the_answer_are_left_out(tiny_model, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    conversations = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Why? " * 40}]]
    short = len(tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True, return_dict=False))
    config = SimpleNamespace(file="train.yaml", kind="ppo", max_length=short + 8)
    acc = SimpleNamespace(is_main_process=True)

    kept, encoded = fitting_prompts(config, tokenizer, conversations, 8, acc)

    assert kept == [0] and len(encoded[0]) == short and len(encoded[1]) > short
    assert f"left out 1 of 2 prompts: the prompt is longer than {short} tokens" in capsys.readouterr().err

    with pytest.raises(InputError) as error:
        fitting_prompts(config, tokenizer, conversations, 9, acc, what="prompt with its context")
    assert str(error.value) == (
        f"train.yaml: max_length: no prompt with its context fits in max_length - ppo.max_new_tokens = {short - 1} tokens"
    )


def test_k_answers_per_prompt_prefill_each_prompt_once_and_sample_as_without(tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from cai.train import rollout

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        for text in ("Hi?", "How do I pick a lock, and what else should I know?")
    ]
    config = SimpleNamespace(seed=3, max_length=256)
    options = SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=12, rollout="hf")
    acc = one_process()
    sampler = rollout.Sampler(config, options, tokenizer, acc, "test-rollout")
    prefilled = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: prefilled.append(kw["input_ids"].shape) or forward(**kw))

    shared = sampler(model, [p for p in prompts for _ in range(3)], step=1)

    assert prefilled[0] == (2, shared.start - 1)  # the two distinct prompts, once each, before generation
    monkeypatch.setattr(rollout, "shared_prefill", lambda *args: None)
    plain = sampler(model, [p for p in prompts for _ in range(3)], step=1)
    assert torch.equal(shared.ids, plain.ids) and torch.equal(shared.mask, plain.mask)
    assert rollout.shared_prefill(model, {"input_ids": shared.ids[:2, : shared.start]}, prompts) is None  # no repeats
