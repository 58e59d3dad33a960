"""Log-probabilities of chosen tokens without the full logits tensor.

A causal LM's logits are [tokens, vocabulary] floats: at SmolLM2's 49,152-word vocabulary and 4,096
tokens a batch, 0.8 GB in fp32, and the loss's backward holds two more of the same size (softmax and
gradient). Trainers read one entry per trained token. For models whose output is the plain
`lm_head(hidden)` (HEAD_ONLY_TYPES), the head is computed here from inside the model's own forward
pass (a pre-hook on the output embeddings, so DDP and FSDP see an ordinary forward), on the trained
positions only, in chunks whose logits are recomputed during backward instead of kept: memory of one
chunk's logits instead of the batch's. Other models (a final soft-capping or logit scale after the
head) get their full logits and the same arithmetic."""

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
    head = _plain_head(model)
    if head is None:
        first = int(positions.min()) if positions.numel() else 0
        logits = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - first).logits
        return _logps(logits[rows, positions - first], tokens)
    picked: list[Tensor] = []

    def compute_on_hidden(module, args):
        hidden = args[0][rows, positions]
        picked.append(head_logps(hidden, module.weight, module.bias, tokens))
        return (args[0][:, :0],)  # the model's own logits: an empty slice

    handle = head.register_forward_pre_hook(compute_on_hidden)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return picked[0]


def head_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor) -> Tensor:
    """log softmax(hidden @ weight^T + bias)[tokens] per row of `hidden` ([n, hidden] -> [n]), CHUNK_TOKENS
    rows at a time; under autograd each chunk's logits are recomputed in backward, not stored."""
    outs = []
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        chunk = (hidden[start : start + CHUNK_TOKENS], weight, bias, tokens[start : start + CHUNK_TOKENS])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk_logps, *chunk, use_reentrant=False))
        else:
            outs.append(_chunk_logps(*chunk))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor) -> Tensor:
    return _logps(torch.nn.functional.linear(hidden, weight, bias), tokens)


def _logps(logits: Tensor, tokens: Tensor) -> Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _plain_head(model):
    """The output embeddings of a HEAD_ONLY_TYPES model (through DDP, FSDP and PEFT wrappers), else None."""
    inner = getattr(model, "module", model)  # DDP
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in HEAD_ONLY_TYPES:
        return None
    head = inner.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) else None
