"""Critique and revise each answer against principles of the constitution (the SL-CAI stage).

Each round draws a principle per row (seeded by run seed, row id, stage and round, weighted by the
principles' weights), asks the critic to critique the current answer against it, then asks the reviser
to rewrite the answer given that critique. All rows' critiques of a round go to the backend as one
batch, then all revisions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from cai.backends.base import ChatRequest, Completion
from cai.constitution import Principle
from cai.seeding import derive_seed, rng
from cai.stages.base import Row, StageContext, StageResult, register

# A revision this similar to its critique restates the critique instead of answering the user.
REPEAT_SIMILARITY = 0.9


def revision_flags(revision: str, critique: str) -> list[str]:
    """Why a revision should not become training data; empty when it is fine."""
    text = " ".join(revision.split()).lower()
    if not text:
        return ["empty_revision"]
    critique_text = " ".join(critique.split()).lower()
    if text in critique_text or difflib.SequenceMatcher(None, text, critique_text, autojunk=False).ratio() >= REPEAT_SIMILARITY:
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
            messages=tuple(messages), max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed
        )

    def run(self, rows: list[Row], ctx: StageContext) -> StageResult:
        result = StageResult()
        few_shot = [m for dialogue in ctx.constitution.few_shot[: self.few_shot] for m in dialogue]
        answers = {row["id"]: row["response"] for row in rows}
        rounds: dict[str, list[dict[str, Any]]] = {row["id"]: [] for row in rows}
        live = list(rows)
        for round_index in range(self.rounds):
            principles: dict[str, Principle] = {
                row["id"]: ctx.constitution.draw(rng(ctx.run_seed, row["id"], ctx.stage_name, round_index)) for row in live
            }
            # A fresh context per round: prompt, the current answer, then the critique request. Earlier
            # rounds are not replayed, so the context stays short however many rounds run.
            contexts = {
                row["id"]: [*few_shot, *row["messages"], {"role": "assistant", "content": answers[row["id"]]}] for row in live
            }
            seed = lambda row, role: derive_seed(ctx.run_seed, row["id"], ctx.stage_name, round_index, role)  # noqa: E731
            critiques = ctx.backends["critic"].complete(
                [
                    self._request([*contexts[row["id"]], {"role": "user", "content": principles[row["id"]].critique}], seed(row, "critic"))
                    for row in live
                ]
            )
            live, critiques = self._keep_ok(live, critiques, "critic", round_index, result)
            revisions = ctx.backends["reviser"].complete(
                [
                    self._request(
                        [
                            *contexts[row["id"]],
                            {"role": "user", "content": principles[row["id"]].critique},
                            {"role": "assistant", "content": critique.text.strip()},
                            {"role": "user", "content": principles[row["id"]].revision},
                        ],
                        seed(row, "reviser"),
                    )
                    for row, critique in zip(live, critiques)
                ]
            )
            ok_rows = []
            for row, critique, revision in zip(live, critiques, revisions):
                if not revision.ok:
                    result.failures.append({"id": row["id"], "reason": f"reviser (round {round_index + 1}): {revision.error}"})
                    continue
                result.completion_tokens += critique.completion_tokens + revision.completion_tokens
                rounds[row["id"]].append(
                    {
                        "principle_id": principles[row["id"]].id,
                        "critique": critique.text.strip(),
                        "revision": revision.text.strip(),
                        "revision_finish_reason": revision.finish_reasons[0],
                    }
                )
                answers[row["id"]] = revision.text.strip()
                ok_rows.append(row)
            live = ok_rows
        for row in live:
            history = rounds[row["id"]]
            result.rows.append(
                {
                    **row,
                    "rounds": history,
                    "revision": history[-1]["revision"],
                    "principle_ids": [r["principle_id"] for r in history],
                    "flags": revision_flags(history[-1]["revision"], history[-1]["critique"]),
                    "models": {**row.get("models", {}), "critic": ctx.models["critic"], "reviser": ctx.models["reviser"]},
                }
            )
        return result

    @staticmethod
    def _keep_ok(rows: list[Row], completions: list[Completion], role: str, round_index: int, result: StageResult):
        kept_rows, kept = [], []
        for row, completion in zip(rows, completions):
            if completion.ok:
                kept_rows.append(row)
                kept.append(completion)
            else:
                result.failures.append({"id": row["id"], "reason": f"{role} (round {round_index + 1}): {completion.error}"})
        return kept_rows, kept


@register("critique_revise")
def build(params: dict[str, Any]) -> CritiqueRevise:
    return CritiqueRevise(**params)
