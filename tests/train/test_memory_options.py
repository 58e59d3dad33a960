"""The memory options every trainer takes: gradient checkpointing (the same losses and gradients as
without, each layer's forward recomputed in the backward pass; online trainers still sample with a KV
cache), the attention implementation (passed to every model a training loads) and the reference kept
in CPU memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic import group_config, ppo_config, preference_records, read_metrics, sft_records, write_config, write_jsonl

from cai.core.errors import InputError
from cai.train import config as train_config
from cai.train import dpo, grpo, ppo, reward, runtime, sft


@pytest.fixture
def layer_calls(monkeypatch) -> list[tuple[bool, int]]:
    """Each decoder layer forward pass: whether it ran with gradients on, and how many positions it took."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls = []
    forward = LlamaDecoderLayer.forward

    def counted(self, hidden_states, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), hidden_states.shape[1]))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    return calls


def offline_config(tmp_path: Path, tiny_model: Path, kind: str, name: str, **doc):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    records = sft_records(12) if kind == "sft" else preference_records(12, seed=0)
    train = write_jsonl(root / f"{kind}.jsonl", records)
    base = {
        "model": str(tiny_model),
        "data": {"train": str(train), "eval_fraction": 0},
        "output_dir": str(tmp_path / name),
        "max_steps": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "max_length": 96,
        "save_every": 10,
        "seed": 3,
    }
    return train_config.load(kind, write_config(tmp_path / f"{name}.yaml", **{**base, **doc}))


@pytest.mark.parametrize(
    ("kind", "trainer", "extra"),
    [
        ("sft", sft, {}),
        ("dpo", dpo, {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}),
    ],
    ids=["sft", "dpo-lora"],
)
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_steps(
    tmp_path, tiny_model, layer_calls, kind, trainer, extra
):
    trainer.train(offline_config(tmp_path, tiny_model, kind, "plain", **extra))
    plain_calls = len(layer_calls)
    layer_calls.clear()
    trainer.train(offline_config(tmp_path, tiny_model, kind, "checkpointed", gradient_checkpointing=True, **extra))

    # every layer's forward pass with gradients runs again in the backward pass
    with_grad = sum(grad for grad, _ in layer_calls)
    assert len(layer_calls) > plain_calls and len(layer_calls) - plain_calls == with_grad / 2
    plain, checkpointed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "checkpointed")
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert checkpointed[step][key] == pytest.approx(plain[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_online_trainers_under_checkpointing_sample_with_a_cache_and_match(
    tmp_path, tiny_model, target_tokens, layer_calls, kind
):
    """Sampling runs in eval mode, where the KV cache stays on: each new token is one position through
    the layers, not the whole prefix again. PPO's value model is checkpointed too."""

    def config(name, **extra):
        if kind == "grpo":
            return group_config(tmp_path, tiny_model, target_tokens, "grpo", name, steps=2, **extra)
        return ppo_config(tmp_path, tiny_model, target_tokens, name, steps=2, **extra)

    trainer = grpo if kind == "grpo" else ppo
    small = ["batch_size=4" if kind == "grpo" else "batch_size=12"]  # a few answers are enough here
    trainer.train(train_config.load(kind, config("plain").file, small))
    layer_calls.clear()
    trainer.train(train_config.load(kind, config("checkpointed").file, [*small, "gradient_checkpointing=true"]))

    plain, checked = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "checkpointed")
    losses = ("loss",) if kind == "grpo" else ("policy_loss", "value_loss")
    for step in (1, 2):
        for key in (*losses, "grad_norm", "reward"):
            assert checked[step][key] == pytest.approx(plain[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert sum(grad for grad, _ in layer_calls) % 2 == 0  # each with-gradient pass recomputed once
    # sampling went token by token through the cache (in training mode, checkpointing turns it off)
    assert any(not grad and positions == 1 for grad, positions in layer_calls)


def test_an_offloaded_reference_keeps_its_weights_off_the_device_and_gives_the_same_steps(
    tmp_path, tiny_model, target_tokens
):
    def config(name, *extra):
        made = group_config(tmp_path, tiny_model, target_tokens, "grpo", name, steps=2)
        return train_config.load("grpo", made.file, ["batch_size=4", *extra])

    offloaded = config("offloaded", "reference_offload=cpu")
    reference = runtime.load_reference(offloaded, runtime.accelerator(offloaded))
    assert {p.device.type for p in reference.parameters()} == {"meta"}  # between passes: in CPU memory only
    grpo.train(config("plain"))
    grpo.train(offloaded)
    plain, moved = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "offloaded")
    for step in (1, 2):
        for key in ("loss", "kl_k3", "grad_norm", "reward"):
            assert moved[step][key] == pytest.approx(plain[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert plain[2]["kl_k3"] > 0  # the reference was read


@pytest.mark.parametrize(
    ("kind", "doc", "message"),
    [
        ("sft", {}, "loads no frozen reference"),
        ("dpo", {"lora": {"r": 4, "alpha": 8}}, "without its adapter"),
    ],
)
def test_reference_offload_without_a_reference_names_the_field(tmp_path, tiny_model, kind, doc, message):
    with pytest.raises(InputError, match=message) as error:
        offline_config(tmp_path, tiny_model, kind, "bad", reference_offload="cpu", **doc)
    assert error.value.field == "reference_offload"


def test_attention_implementation_reaches_every_model_a_training_loads(tmp_path, tiny_model):
    eager = offline_config(tmp_path, tiny_model, "dpo", "eager", attn_implementation="eager")
    from transformers import AutoModelForCausalLM

    policy = runtime.load_model(AutoModelForCausalLM, eager, None, "CAUSAL_LM")
    reference = runtime.load_reference(eager, runtime.accelerator(eager))
    assert policy.config._attn_implementation == reference.config._attn_implementation == "eager"
    # a frozen scorer too: the reward models of ppo, grpo, rejection sampling, hir and nash-md
    scorer = reward.RewardScorer({"rm": (tiny_model, 1.0)}, load_options=runtime.load_options(eager))
    assert scorer.models["rm"][0].config._attn_implementation == "eager"

    dpo.train(eager)
    dpo.train(offline_config(tmp_path, tiny_model, "dpo", "sdpa", attn_implementation="sdpa"))
    with_eager, with_sdpa = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "sdpa")
    for step in (1, 2, 3):
        assert with_eager[step]["loss"] == pytest.approx(with_sdpa[step]["loss"], abs=1e-4), step


def test_flash_attention_without_its_package_or_a_gpu_names_the_field(tmp_path, tiny_model):
    with pytest.raises(InputError) as error:
        offline_config(tmp_path, tiny_model, "sft", "flash", attn_implementation="flash_attention_2")
    assert error.value.field == "attn_implementation" and "flash_attention_2" in str(error.value)
    with pytest.raises(InputError) as error:
        offline_config(tmp_path, tiny_model, "sft", "bad", attn_implementation="paged")
    assert "attn_implementation" in str(error.value)
