"""Direct scoring (the RLAIF paper's d-RLAIF): the judge rates each answer from 1 to 10 under a
comparison principle, and the score is the expectation over the score tokens' probabilities, not
the one number it would print."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cai import feedback
from cai.backends.base import ChatRequest
from cai.seeding import rng
from cai.stages.base import Row, StageContext, StageResult, register
from cai.stages.compare import conversation_text, draw_distinct

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
    roles: tuple[str, ...] = ("judge",)

    def run(self, rows: list[Row], ctx: StageContext) -> StageResult:
        jobs = []  # (row index, answer index, principle)
        for r, row in enumerate(rows):
            principles = draw_distinct(ctx.constitution, self.ensemble, rng(ctx.run_seed, row["id"], ctx.stage_name))
            for a in range(len(row.get("responses") or [row["response"]])):
                jobs.extend((r, a, p) for p in principles)
        requests = [
            ChatRequest(
                messages=(
                    {
                        "role": "user",
                        "content": SCORE_TEMPLATE.format(
                            conversation=conversation_text(rows[r]["messages"]),
                            question=p.comparison,
                            answer=(rows[r].get("responses") or [rows[r]["response"]])[a],
                        ),
                    },
                )
            )
            for r, a, p in jobs
        ]
        logprobs = ctx.backends["judge"].choice_logprobs(requests, [str(s) for s in SCORES]) if requests else []
        per_answer: dict[tuple[int, int], dict[str, float | None]] = {}
        for (r, a, p), lp in zip(jobs, logprobs):
            per_answer.setdefault((r, a), {})[p.id] = feedback.expected_score(lp, SCORES)
        result = StageResult()
        for r, row in enumerate(rows):
            scores = []
            for a in range(len(row.get("responses") or [row["response"]])):
                by_principle = per_answer[(r, a)]
                valid = [s for s in by_principle.values() if s is not None]
                scores.append({"score": sum(valid) / len(valid) if valid else None, "principle_scores": by_principle})
            result.rows.append({**row, "scores": scores, "models": {**row.get("models", {}), "judge": ctx.models["judge"]}})
        return result


@register("score")
def build(params: dict[str, Any]) -> Score:
    return Score(**params)
