"""Log-probabilities of chosen tokens without the full logits tensor.

A causal LM's logits are [tokens, vocabulary] floats: at SmolLM2's 49,152-word vocabulary and 4,096
tokens a batch, 0.8 GB in fp32, and the loss's backward holds two more of the same size (softmax and
gradient). Trainers read one entry per trained token. For models whose output is the plain
`lm_head(hidden)` (HEAD_ONLY_TYPES), the head is computed here from inside the model's own forward
pass (a pre-hook on the output embeddings, so DDP and FSDP see an ordinary forward), on the trained
positions only, in chunks whose logits are recomputed during backward instead of kept: memory of one
chunk's logits instead of the batch's. Other models (a final soft-capping or logit scale after the
head), and a reference offloaded by accelerate (which reads no gradient: its logits are not kept for a
backward pass), get their full logits from the first trained position on, and the same arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# model types whose forward ends `logits = self.lm_head(hidden_states[:, slice_indices, :])` with nothing after
HEAD_ONLY_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "smollm3", "gemma"}
)
CHUNK_TOKENS = 1024


def picked_logps(model, inputs: dict[str, Tensor], rows: Tensor, positions: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[i] | row rows[i] up to position positions[i]) for each i, in at least fp32: `model`
    run once on `inputs` (its forward's keyword arguments), gradients flowing to it when enabled."""
    return _picked(model, inputs, rows, positions, tokens, 1.0, None)[0]


def picked_logps_and_entropy(
    model,
    inputs: dict[str, Tensor],
    rows: Tensor,
    positions: Tensor,
    tokens: Tensor,
    temperature: float,
    entropy_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`picked_logps` of the logits at a sampling temperature, and the entropy of each of those
    next-token distributions, with gradients only when `entropy_grad` (an entropy bonus in the loss)."""
    return _picked(model, inputs, rows, positions, tokens, temperature, "grad" if entropy_grad else "metric")


def _picked(model, inputs, rows, positions, tokens, temperature: float, entropy: str | None):
    head = _plain_head(model)
    if head is None:
        first = int(positions.min()) if positions.numel() else 0
        logits = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - first).logits
        return _stats(logits[rows, positions - first], tokens, temperature, entropy)
    out: list[tuple[Tensor, Tensor | None]] = []

    def compute_on_hidden(module, args):
        hidden = args[0][rows, positions]
        out.append(head_stats(hidden, module.weight, module.bias, tokens, temperature, entropy))
        return (args[0][:, :0],)  # the model's own logits: an empty slice

    handle = head.register_forward_pre_hook(compute_on_hidden)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return out[0]


def head_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float, entropy: str | None
) -> tuple[Tensor, Tensor | None]:
    """The tokens' log-probs (and with `entropy` the distributions' entropies) from the head's logits
    divided by `temperature`, CHUNK_TOKENS rows at a time; under autograd each chunk's logits are
    recomputed in backward, not stored."""
    parts = []
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        chunk = (hidden[start : start + CHUNK_TOKENS], weight, bias, tokens[start : start + CHUNK_TOKENS])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_stats, *chunk, temperature, entropy, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*chunk, temperature, entropy))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, (empty if entropy else None)
    return torch.cat([p[0] for p in parts]), (torch.cat([p[1] for p in parts]) if entropy else None)


def _chunk_stats(hidden, weight, bias, tokens, temperature: float, entropy: str | None):
    return _stats(torch.nn.functional.linear(hidden, weight, bias), tokens, temperature, entropy)


def _stats(logits: Tensor, tokens: Tensor, temperature: float, entropy: str | None) -> tuple[Tensor, Tensor | None]:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - normaliser
    if entropy is None:
        return logps, None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        entropies = normaliser - (torch.softmax(logits, -1) * logits).sum(-1)
    return logps, entropies


def _plain_head(model):
    """The output embeddings of a HEAD_ONLY_TYPES model (through DDP, FSDP and PEFT wrappers), else None.
    None too for a head under accelerate's offload hooks (reference_offload): its weights reach the
    device inside its own forward, after a pre-hook has run."""
    inner = getattr(model, "module", model)  # DDP
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in HEAD_ONLY_TYPES:
        return None
    head = inner.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) and not hasattr(head, "_hf_hook") else None
