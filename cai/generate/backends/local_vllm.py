"""The local vLLM engine, CPU or GPU, through its asynchronous engine (AsyncLLM): every request is added
to the running engine the moment a row needs it, so continuous batching stays full while rows sit at
different stages. vLLM's own tensor and data parallelism come through `options`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from cai.generate.backends.base import BackendSpec, ChatRequest, Completion, register

# Defaults that make vLLM start on a small CPU box; any of them can be overridden in `options`.
CPU_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",  # bf16 matmuls are several times slower on CPUs without AMX
    "kv_cache_memory_bytes": 2 << 30,  # a fixed KV cache: vLLM refuses to start if a fraction of RAM is not free
    "enforce_eager": True,  # measured here: same tokens/s as compiled, and the engine starts in ~35 s, not ~140 s
    # With chunked prefill, a seeded request whose prompt is split over steps makes vLLM 0.32 rewind its
    # sampling generator, which CPU generators cannot do ("CPU Generator does not use offset"): the
    # engine dies on any large batch of long seeded prompts. Whole-prompt prefill avoids it.
    "enable_chunked_prefill": False,
}
COMMON_DEFAULTS: dict[str, Any] = {
    "enable_prefix_caching": True,  # critique and revision prompts of a row share the whole conversation
    "trust_remote_code": False,
    "load_format": "safetensors",  # never unpickle .bin weights
    "seed": 0,
    # JSON replies without free whitespace: a small judge under a JSON Schema otherwise can spend its
    # whole token budget on newlines between the braces, and compact JSON is fewer tokens anyway.
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def engine_args(options: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine arguments: cai's defaults (CPU ones without a GPU), then the user's options."""
    import torch

    args = dict(COMMON_DEFAULTS)
    if not torch.cuda.is_available():
        args.update(CPU_DEFAULTS)
    args.update(options)
    return args


def prompt_ids(tokenizer, messages) -> list[int]:
    """A chat request's prompt tokens as the engine gets them: the model's chat template with the
    assistant's turn opened. `cai train judge` trains on exactly these tokens."""
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def shutdown(llm) -> None:
    """Stop an offline engine's (`vllm.LLM`, used by training rollouts) core process now, not whenever
    the garbage collector gets to it."""
    engine = getattr(llm, "llm_engine", None)
    stop = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if stop:
        stop()


class LocalVLLM:
    def __init__(self, spec: BackendSpec):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cai.core.models import resolve

        self.spec = spec
        args = {"disable_log_stats": True, **engine_args(spec.options)}
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=str(resolve(spec.model, [Path(d) for d in spec.base_dirs])), **args)
        )
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = self.engine.model_config.max_model_len
        self._ids = itertools.count()

    def endpoint_stats(self) -> list[dict[str, Any]]:
        return []

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        # The chat template is applied once, here, and its tokens handed to the engine.
        return prompt_ids(self.tokenizer, request.messages)

    async def _generate(self, prompt_ids: list[int], params):
        """The engine's final output for one prompt."""
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=f"cai-{next(self._ids)}"
        ):
            final = output
        return final

    async def complete(self, request: ChatRequest) -> Completion:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        ids = self._prompt_ids(request)
        room = self.max_model_len - len(ids)
        if room < 1:
            return Completion(error=f"prompt has {len(ids)} tokens, the model's limit is {self.max_model_len}")
        params = SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=min(request.max_tokens, room),
            seed=request.seed,
            stop=list(request.stop) or None,
            structured_outputs=StructuredOutputsParams(json=request.json_schema) if request.json_schema else None,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one message per request, not one per token
        )
        out = await self._generate(ids, params)
        return Completion(
            texts=tuple(o.text for o in out.outputs),
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=sum(len(o.token_ids) for o in out.outputs),
            finish_reasons=tuple(str(o.finish_reason) for o in out.outputs),
        )

    async def choice_logprobs(self, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        """Exact log P(choice | conversation). Single-token choices (`A`/`B`, `1`..`9`) are read at the
        first generated position, one engine request for all of them; each multi-token choice (`10`,
        `(A)`) is scored as a prompt continuation, one engine request per choice."""
        import asyncio

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        final = RequestOutputKind.FINAL_ONLY
        choice_ids = {c: self.tokenizer.encode(c, add_special_tokens=False) for c in choices}
        single = {c: ids[0] for c, ids in choice_ids.items() if len(ids) == 1}
        multi = {c: ids for c, ids in choice_ids.items() if len(ids) != 1}
        prompt_ids = self._prompt_ids(request)
        scores: dict[str, float] = {}

        async def score_single() -> None:
            params = SamplingParams(
                max_tokens=1, temperature=0.0, logprob_token_ids=list(single.values()), output_kind=final
            )
            out = await self._generate(prompt_ids, params)
            scores.update({c: out.outputs[0].logprobs[0][t].logprob for c, t in single.items()})

        async def score_multi(choice: str, ids: list[int]) -> None:
            # vLLM can limit scored prompt rows only on its GPU model runner (prompt_logprob_start), so
            # this path pays a vocabulary-wide row per prompt token.
            out = await self._generate(
                prompt_ids + ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=final)
            )
            start = len(prompt_ids)
            scores[choice] = sum(out.prompt_logprobs[start + k][t].logprob for k, t in enumerate(ids))

        await asyncio.gather(*([score_single()] if single else []), *(score_multi(c, ids) for c, ids in multi.items()))
        return {c: scores[c] for c in choices}

    async def close(self) -> None:
        self.engine.shutdown()
        del self.engine


@register("vllm")
def create(spec: BackendSpec) -> LocalVLLM:
    return LocalVLLM(spec)
