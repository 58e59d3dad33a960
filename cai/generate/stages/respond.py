"""The responder answers each prompt: the initial answers that critique-revision will improve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cai.core.seeding import derive_seed
from cai.generate.backends.base import ChatRequest
from cai.generate.stages.base import Processed, Row, RowFailed, StageContext, register


@dataclass(frozen=True)
class Respond:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    system_prompt: str | None = None
    samples: int = 1  # K > 1 keeps K seeded answers in `responses` (for AI-feedback pairs); `response` is the first
    roles: tuple[str, ...] = ("responder",)

    async def process(self, row: Row, ctx: StageContext) -> Processed:
        messages = tuple(row["messages"])
        if self.system_prompt and messages[0]["role"] != "system":
            messages = ({"role": "system", "content": self.system_prompt}, *messages)
        request = ChatRequest(
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=derive_seed(ctx.run_seed, row["id"], ctx.stage_name),
            n=self.samples,
        )
        completion = await ctx.backends["responder"].complete(request)
        if not completion.ok:
            raise RowFailed(f"responder: {completion.error}")
        out = {
            **row,
            "response": completion.text.strip(),
            **({"responses": [t.strip() for t in completion.texts]} if self.samples > 1 else {}),
            "response_finish_reason": completion.finish_reasons[0],
            "models": {**row.get("models", {}), "responder": ctx.models["responder"]},
        }
        return Processed(out, completion.completion_tokens)


@register("respond")
def build(params: dict[str, Any]) -> Respond:
    return Respond(**params)
