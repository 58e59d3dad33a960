"""Critique and revise each answer against principles of the constitution (the SL-CAI stage).

Each round draws a principle per row (seeded by run seed, row id, stage and round, weighted by the
principles' weights), asks the critic to critique the current answer against it, then asks the reviser
to rewrite the answer given that critique. Each row goes through its rounds on its own: its critique is
requested the moment its answer exists, its revision the moment its critique does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from cai.core.seeding import derive_seed, rng
from cai.generate.backends.base import ChatRequest
from cai.generate.constitution import Principle
from cai.generate.records import Round
from cai.generate.stages.base import Processed, Row, RowFailed, StageContext, register

# A revision this similar to its critique restates the critique instead of answering the user.
REPEAT_SIMILARITY = 0.9


def revision_flags(revision: str, critique: str) -> list[str]:
    """Why a revision should not become training data; empty when it is fine."""
    text = " ".join(revision.split()).lower()
    if not text:
        return ["empty_revision"]
    critique_text = " ".join(critique.split()).lower()
    matcher = difflib.SequenceMatcher(None, text, critique_text, autojunk=False)
    # quick_ratio bounds ratio from above in linear time: most revisions are ruled out without the quadratic match
    if text in critique_text or (matcher.quick_ratio() >= REPEAT_SIMILARITY and matcher.ratio() >= REPEAT_SIMILARITY):
        return ["revision_repeats_critique"]
    return []


@dataclass(frozen=True)
class CritiqueRevise:
    rounds: int = 1
    few_shot: int = 0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    roles: tuple[str, ...] = ("critic", "reviser")

    def _request(self, messages: list[dict[str, str]], seed: int) -> ChatRequest:
        return ChatRequest(
            messages=tuple(messages),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
        )

    async def process(self, row: Row, ctx: StageContext) -> Processed:
        few_shot = [m for dialogue in ctx.constitution.few_shot[: self.few_shot] for m in dialogue]
        answer = row["response"]
        history: list[Round] = []
        tokens = 0
        for round_index in range(self.rounds):
            principle: Principle = ctx.constitution.draw(rng(ctx.run_seed, row["id"], ctx.stage_name, round_index))
            # A fresh context per round: prompt, the current answer, then the critique request. Earlier
            # rounds are not replayed, so the context stays short however many rounds run.
            context = [
                *few_shot,
                *row["messages"],
                {"role": "assistant", "content": answer},
                {"role": "user", "content": principle.critique},
            ]
            seed = lambda role: derive_seed(ctx.run_seed, row["id"], ctx.stage_name, round_index, role)
            critique = await ctx.backends["critic"].complete(self._request(context, seed("critic")))
            if not critique.ok:
                raise RowFailed(f"critic (round {round_index + 1}): {critique.error}")
            revision = await ctx.backends["reviser"].complete(
                self._request(
                    [
                        *context,
                        {"role": "assistant", "content": critique.text.strip()},
                        {"role": "user", "content": principle.revision},
                    ],
                    seed("reviser"),
                )
            )
            if not revision.ok:
                raise RowFailed(f"reviser (round {round_index + 1}): {revision.error}")
            tokens += critique.completion_tokens + revision.completion_tokens
            answer = revision.text.strip()
            history.append(
                {
                    "principle_id": principle.id,
                    "critique": critique.text.strip(),
                    "revision": answer,
                    "revision_finish_reason": revision.finish_reasons[0],
                }
            )
        out = {
            **row,
            "rounds": history,
            "revision": history[-1]["revision"],
            "principle_ids": [r["principle_id"] for r in history],
            "flags": revision_flags(history[-1]["revision"], history[-1]["critique"]),
            "models": {**row.get("models", {}), "critic": ctx.models["critic"], "reviser": ctx.models["reviser"]},
        }
        return Processed(out, tokens)


@register("critique_revise")
def build(params: dict[str, Any]) -> CritiqueRevise:
    return CritiqueRevise(**params)
