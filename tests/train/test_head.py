"""The chosen tokens' log-probs computed on trained positions in checkpointed chunks (cai.train.head)
equal those read from the full logits, values and gradients, and the full logits are never built."""

from __future__ import annotations

import pytest
import torch

from cai.train import head


def full_logps(model, inputs, rows, positions, tokens):
    logits = model(**inputs).logits[rows, positions].float()
    return logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)


@pytest.fixture
def llama(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (3, 40), generator=generator)
    mask = torch.rand(3, 39, generator=generator) < 0.6
    rows, positions = mask.nonzero(as_tuple=True)
    return {"input_ids": ids}, rows, positions, ids[rows, positions + 1]


def grads(model, logps):
    model.zero_grad()
    (-logps.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict) -> None:
    """Each parameter's gradient within float32 rounding of the reference's: the chunks sum in another
    order, so an entry's error scales with the tensor's largest entries (an embedding row gathers many
    positions), not with the entry itself."""
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max().item(), msg=name)


def test_head_logps_in_chunks_match_the_full_logits(monkeypatch):
    monkeypatch.setattr(head, "CHUNK_TOKENS", 7)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 50, (30,), generator=generator)
    chunked = head.head_stats(hidden, weight, bias, tokens, 1.0, None)[0]
    got = torch.autograd.grad(chunked.sum(), (hidden, weight, bias))
    logits = hidden @ weight.T + bias
    expected = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    want = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_llama_never_builds_its_full_logits_and_gets_the_same_values_and_gradients(llama, batch, monkeypatch):
    monkeypatch.setattr(head, "CHUNK_TOKENS", 16)  # several chunks over this batch's trained tokens
    inputs, rows, positions, tokens = batch
    expected = full_logps(llama, inputs, rows, positions, tokens)
    want = grads(llama, expected)
    widths = []
    handle = llama.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    got = head.picked_logps(llama, inputs, rows, positions, tokens)
    handle.remove()
    assert widths == [0]  # the model's own logits: none
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads(llama, got), want)


def test_a_model_with_something_after_its_head_reads_its_own_logits(llama, batch):
    """A soft-capped or scaled head (gemma2, cohere, granite) is not the plain lm_head this module
    recomputes: those models keep their logits, from the first trained position on."""
    inputs, rows, positions, tokens = batch
    expected = full_logps(llama, inputs, rows, positions, tokens)
    llama.config.model_type = "granite"
    widths = []
    handle = llama.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    got = head.picked_logps(llama, inputs, rows, positions, tokens)
    handle.remove()
    assert widths == [40 - int(positions.min())]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logps_and_entropy_at_a_temperature_match_the_full_logits(llama, batch, monkeypatch, entropy_grad):
    monkeypatch.setattr(head, "CHUNK_TOKENS", 16)
    inputs, rows, positions, tokens = batch
    logits = llama(**inputs).logits[rows, positions].float() / 0.7
    expected = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    expected_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    want = grads(llama, expected + (expected_entropy if entropy_grad else 0))
    got, entropy = head.picked_logps_and_entropy(llama, inputs, rows, positions, tokens, 0.7, entropy_grad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert entropy.requires_grad == entropy_grad
    assert_grads_close(grads(llama, got + entropy), want)
