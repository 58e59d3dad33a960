"""AI feedback (RL-CAI / RLAIF): the judge compares two answers to a prompt under comparison
principles of the constitution, in the multiple-choice format, scored by option log-probabilities.

For each pair, each of `ensemble` principles (drawn per row and pair, seeded, weighted) and each
presentation order (the swap debiases position), the judge is asked which response is better and
the log-probabilities of `A` and `B` are normalised over the two options. The swap-averaged,
ensembled probability that the first answer is better becomes the pair's label probability.
Answers sit in delimited blocks, so text inside an answer cannot pose as part of the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from cai import feedback
from cai.backends.base import ChatRequest
from cai.constitution import Constitution, Principle
from cai.seeding import rng
from cai.stages.base import Row, StageContext, StageResult, register

OPTIONS = ("A", "B")
JUDGE_TEMPLATE = """Consider the following conversation between a human and an AI assistant.

<conversation>
{conversation}
</conversation>

{question}

Options:
(A)
<response_a>
{first}
</response_a>

(B)
<response_b>
{second}
</response_b>

{instruction}"""
ANSWER_INSTRUCTION = "Reply with a single letter: A or B."
COT_INSTRUCTION = "Think step by step about which response better follows the principle, then say which one you choose."


def conversation_text(messages: list[dict[str, str]]) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def judge_messages(messages, principle: Principle, first: str, second: str, instruction: str) -> tuple[dict[str, str], ...]:
    text = JUDGE_TEMPLATE.format(
        conversation=conversation_text(messages), question=principle.comparison, first=first, second=second, instruction=instruction
    )
    return ({"role": "user", "content": text},)


def draw_distinct(constitution: Constitution, count: int, random) -> list[Principle]:
    """`count` different comparison principles, each draw weighted like Constitution.draw."""
    pool = [p for p in constitution.principles if p.comparison]
    chosen: list[Principle] = []
    while pool and len(chosen) < count:
        pick = random.choices(pool, weights=[p.weight for p in pool], k=1)[0]
        chosen.append(pick)
        pool.remove(pick)
    return chosen


@dataclass(frozen=True)
class Compare:
    pairing: str = "samples"  # "samples": all pairs of the responder's K answers; "initial_vs_revision"
    ensemble: int = 1
    swap: bool = True
    tie_threshold: float = 0.05
    chain_of_thought: bool = False
    cot_max_tokens: int = 256
    roles: tuple[str, ...] = ("judge",)

    def answers(self, row: Row) -> list[str]:
        if self.pairing == "initial_vs_revision":
            return [row["response"], row["revision"]]
        return list(row.get("responses") or [row["response"]])

    def run(self, rows: list[Row], ctx: StageContext) -> StageResult:
        # One vote per (row, pair, principle, order): build them all, then score them in one batch.
        votes: list[dict[str, Any]] = []
        pairs_by_row: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            answers = self.answers(row)
            pairs_by_row[row["id"]] = []
            for i, j in combinations(range(len(answers)), 2):
                if answers[i].strip() == answers[j].strip():
                    continue  # a pair of equal answers teaches nothing and would make chosen == rejected
                principles = draw_distinct(ctx.constitution, self.ensemble, rng(ctx.run_seed, row["id"], ctx.stage_name, i, j))
                pair = {"answers": [i, j], "votes": []}
                pairs_by_row[row["id"]].append(pair)
                for principle in principles:
                    for swapped in (False, True) if self.swap else (False,):
                        first, second = (answers[j], answers[i]) if swapped else (answers[i], answers[j])
                        votes.append({"pair": pair, "principle": principle, "swapped": swapped, "row": row, "first": first, "second": second})
        if not votes:
            return StageResult(rows=[{**row, "pairs": pairs_by_row[row["id"]]} for row in rows])

        judge = ctx.backends["judge"]
        requests = [
            ChatRequest(messages=judge_messages(v["row"]["messages"], v["principle"], v["first"], v["second"], ANSWER_INSTRUCTION))
            for v in votes
        ]
        tokens = 0
        if self.chain_of_thought:
            cot = [ChatRequest(messages=judge_messages(v["row"]["messages"], v["principle"], v["first"], v["second"], COT_INSTRUCTION), max_tokens=self.cot_max_tokens) for v in votes]
            reasoning = judge.complete(cot)
            tokens += sum(c.completion_tokens for c in reasoning)
            requests = [
                ChatRequest(messages=(*c.messages, {"role": "assistant", "content": r.text if r.ok else ""}, {"role": "user", "content": ANSWER_INSTRUCTION}))
                for c, r in zip(cot, reasoning)
            ]
            for v, r in zip(votes, reasoning):
                v["reasoning"] = r.text if r.ok else None
        scores = judge.choice_logprobs(requests, OPTIONS)
        for v, logprobs in zip(votes, scores):
            probs = feedback.normalise(logprobs, OPTIONS)
            # P(the pair's first answer is better): it was shown as (A) unless swapped
            p_first = None if probs is None else probs["B" if v["swapped"] else "A"]
            v["pair"]["votes"].append(
                {"principle_id": v["principle"].id, "swapped": v["swapped"], "p_first": p_first, **({"reasoning": v["reasoning"]} if "reasoning" in v else {})}
            )

        result = StageResult(completion_tokens=tokens)
        for row in rows:
            pairs = [self._label(pair) for pair in pairs_by_row[row["id"]]]
            result.rows.append({**row, "pairs": pairs, "group_id": row["id"], "models": {**row.get("models", {}), "judge": ctx.models["judge"]}})
        return result

    def _label(self, pair: dict[str, Any]) -> dict[str, Any]:
        by_principle: dict[str, dict[bool, float | None]] = {}
        for vote in pair["votes"]:
            by_principle.setdefault(vote["principle_id"], {})[vote["swapped"]] = vote["p_first"]
        per_principle, consistent = {}, []
        for principle_id, orders in by_principle.items():
            if any(p is None for p in orders.values()):
                continue  # an order without a usable choice makes this principle's vote invalid
            if self.swap:
                per_principle[principle_id] = feedback.swap_average(orders[False], orders[True])
                consistent.append(feedback.position_consistent(orders[False], orders[True]))
            else:
                per_principle[principle_id] = orders[False]
        p = feedback.ensemble(list(per_principle.values())) if per_principle else None
        return {
            **pair,
            "principle_ids": list(by_principle),
            "principle_probs": per_principle,
            "p_first": p,
            "label": feedback.label(p, self.tie_threshold),
            "position_consistent": all(consistent) if self.swap and consistent else None,
            "method": "logprobs",
        }


@register("compare")
def build(params: dict[str, Any]) -> Compare:
    return Compare(**params)
