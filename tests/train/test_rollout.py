"""The prompt set an online trainer (and distillation's teacher) samples from: prompts that leave no
room for the answer are left out, and none fitting is an error naming max_length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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
