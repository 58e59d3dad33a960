"""Direct scoring (the RLAIF paper's d-RLAIF): the judge rates each answer from 1 to 10 under a
comparison principle, and the score is the expectation over the score tokens' probabilities, not
the one number it would print."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cai.core.seeding import rng
from cai.generate import feedback
from cai.generate.backends.base import BackendCallError, ChatRequest
from cai.generate.records import row_samples
from cai.generate.stages.base import Processed, Row, RowFailed, StageContext, register
from cai.generate.stages.compare import conversation_text, draw_distinct

SCORES = tuple(range(1, 11))
SCORE_TEMPLATE = """Consider the following conversation between a human and an AI assistant.

<conversation>
{conversation}
</conversation>

{question}
Rate the assistant's final response below on a scale from 1 to 10, where 10 means it follows this
principle best.

<response>
{answer}
</response>

Reply with a single number from 1 to 10."""


@dataclass(frozen=True)
class Score:
    ensemble: int = 1
    # an answer scored above it is desirable: the label of the unpaired (KTO) dataset the run exports
    desirable_above: float = 5.5
    roles: tuple[str, ...] = ("judge",)

    async def process(self, row: Row, ctx: StageContext) -> Processed:
        principles = draw_distinct(ctx.constitution, self.ensemble, rng(ctx.run_seed, row["id"], ctx.stage_name))
        answers = row_samples(row)
        conversation = conversation_text(row["messages"])

        async def rate(answer: str, principle) -> float | None:
            content = SCORE_TEMPLATE.format(conversation=conversation, question=principle.comparison, answer=answer)
            logprobs = await ctx.backends["judge"].choice_logprobs(
                ChatRequest(messages=({"role": "user", "content": content},)), [str(s) for s in SCORES]
            )
            return feedback.expected_score(logprobs, SCORES)

        try:
            rated = await asyncio.gather(*(rate(answer, p) for answer in answers for p in principles))
        except BackendCallError as exc:
            raise RowFailed(str(exc)) from None
        scores = []
        for a in range(len(answers)):
            by_principle = {p.id: rated[a * len(principles) + k] for k, p in enumerate(principles)}
            valid = [s for s in by_principle.values() if s is not None]
            score = sum(valid) / len(valid) if valid else None
            desirable = None if score is None else score > self.desirable_above
            scores.append({"score": score, "principle_scores": by_principle, "desirable": desirable})
        return Processed({**row, "scores": scores, "models": {**row.get("models", {}), "judge": ctx.models["judge"]}})


@register("score")
def build(params: dict[str, Any]) -> Score:
    return Score(**params)
