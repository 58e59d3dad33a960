"""The local vLLM engine (offline `LLM`), CPU or GPU: every call is one batch the engine schedules at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cai.backends.base import BackendSpec, ChatRequest, Completion, register

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


def shutdown(llm) -> None:
    """Stop an offline engine's core process now, not whenever the garbage collector gets to it."""
    engine = getattr(llm, "llm_engine", None)
    stop = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if stop:
        stop()


class LocalVLLM:
    def __init__(self, spec: BackendSpec):
        from vllm import LLM

        from cai.models import resolve

        self.spec = spec
        self.llm = LLM(model=resolve(spec.model, [Path(d) for d in spec.base_dirs]), **engine_args(spec.options))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def identity(self) -> dict[str, Any]:
        return self.spec.identity()

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def complete(self, requests: Sequence[ChatRequest], on_done=None) -> list[Completion]:
        # The offline engine returns a batch at once: the caller records it whole, on_done is not needed.
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        results: list[Completion | None] = [None] * len(requests)
        prompts, params, positions = [], [], []
        for i, request in enumerate(requests):
            ids = self._prompt_ids(request)
            room = self.max_model_len - len(ids)
            if room < 1:
                results[i] = Completion(error=f"prompt has {len(ids)} tokens, the model's limit is {self.max_model_len}")
                continue
            # The chat template is applied once, here, and its tokens handed to the engine; vLLM's own
            # chat() would template every conversation a second time.
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    n=request.n,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=min(request.max_tokens, room),
                    seed=request.seed,
                    stop=list(request.stop) or None,
                    structured_outputs=StructuredOutputsParams(json=request.json_schema) if request.json_schema else None,
                )
            )
            positions.append(i)
        if prompts:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for i, out in zip(positions, outputs):
                results[i] = Completion(
                    texts=tuple(o.text for o in out.outputs),
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=sum(len(o.token_ids) for o in out.outputs),
                    finish_reasons=tuple(str(o.finish_reason) for o in out.outputs),
                )
        return results  # type: ignore[return-value]

    def choice_logprobs(self, requests: Sequence[ChatRequest], choices: Sequence[str]) -> list[dict[str, float]]:
        """Exact log P(choice | conversation). Single-token choices (`A`/`B`, `1`..`9`) are read at the
        first generated position, one engine request per conversation for all of them; multi-token
        choices (`10`, `(A)`) are scored as prompt continuations, one request per conversation and choice."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        choice_ids = {c: self.tokenizer.encode(c, add_special_tokens=False) for c in choices}
        single = {c: ids[0] for c, ids in choice_ids.items() if len(ids) == 1}
        multi = {c: ids for c, ids in choice_ids.items() if len(ids) != 1}
        prompt_ids = [self._prompt_ids(r) for r in requests]
        scores: list[dict[str, float]] = [{} for _ in requests]
        if single:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(single.values()))
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
            for score, out in zip(scores, outputs):
                score.update({c: out.outputs[0].logprobs[0][t].logprob for c, t in single.items()})
        if multi:
            # vLLM can limit scored prompt rows only on its GPU model runner (prompt_logprob_start), so
            # this path pays a vocabulary-wide row per prompt token.
            jobs = [(r, c, len(ids)) for r, ids in enumerate(prompt_ids) for c in multi]
            prompts = [TokensPrompt(prompt_token_ids=prompt_ids[r] + multi[c]) for r, c, _ in jobs]
            outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
            for (r, c, start), out in zip(jobs, outputs):
                scores[r][c] = sum(out.prompt_logprobs[start + k][t].logprob for k, t in enumerate(multi[c]))
        return [{c: score[c] for c in choices} for score in scores]

    def close(self) -> None:
        shutdown(self.llm)
        del self.llm


@register("vllm")
def create(spec: BackendSpec) -> LocalVLLM:
    return LocalVLLM(spec)
