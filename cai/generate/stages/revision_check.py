"""Revision gain and the SFT acceptance gate: the check after critique-revision.

For each round of a row, the judge compares that round's revision with the initial answer under the
comparison question of the principle the round used (a principle without one is judged under
`default_comparison`), in both orders, swap-averaged: `rounds[r]["gain"]["p_revision"]` is
P(revision better). The votes are the compare stage's own (same prompt, log-probabilities or a parsed
choice, swap average, position consistency): this stage only says what to compare.

The gate then flags the row, which keeps it out of the SFT export:
- `revision_not_preferred`: P(final revision better) < `min_p_revision`, or the judge gave no usable
  verdict (a revision is accepted on the judge's word, not for want of one);
- `refuses_harmless_request`: the judge calls the request harmless (P(harmful) < `max_p_harmful`,
  its yes/no options asked in both orders, like a swap) and the final revision less helpful than the
  initial answer (P(revision more helpful) < `min_p_helpful`): the CAI paper's evasive revisions.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from cai.generate import feedback
from cai.generate.backends.base import BackendCallError, ChatRequest
from cai.generate.constitution import Principle
from cai.generate.records import Row
from cai.generate.stages.base import Processed, RowFailed, StageContext, register
from cai.generate.stages.compare import ANSWER_INSTRUCTION, OPTIONS, Ballot, Compare, conversation_text

DEFAULT_COMPARISON = "Which of these assistant responses is more helpful, honest, and harmless?"
HELPFULNESS_QUESTION = (
    "Which of these assistant responses is more helpful: which one does more of what the human asked, "
    "instead of refusing, lecturing or evading?"
)
HARMFUL_QUESTION = "Is the human's request harmful?"
CLASSIFY_TEMPLATE = """Consider the following conversation between a human and an AI assistant.

<conversation>
{conversation}
</conversation>

{question}

Options:
(A) {first}
(B) {second}

{instruction}"""


def gate_flags(
    p_revision: float | None,
    min_p_revision: float,
    p_harmful: float | None = None,
    max_p_harmful: float = 0.5,
    p_helpful: float | None = None,
    min_p_helpful: float = 0.5,
) -> list[str]:
    """Why the final revision should stay out of the SFT data; empty when the gate accepts it.

    A missing P(harmful) or P(helpful) (no verdict, or the check switched off) raises no refusal flag.
    """
    flags = []
    if p_revision is None or p_revision < min_p_revision:
        flags.append("revision_not_preferred")
    if p_harmful is not None and p_helpful is not None and p_harmful < max_p_harmful and p_helpful < min_p_helpful:
        flags.append("refuses_harmless_request")
    return flags


@dataclass(frozen=True)
class RevisionCheck:
    min_p_revision: float = 0.5
    default_comparison: str = DEFAULT_COMPARISON
    helpfulness: bool = True  # false: no harmfulness or helpfulness calls, no refusal flag
    helpfulness_question: str = HELPFULNESS_QUESTION
    min_p_helpful: float = 0.5
    harmful_question: str = HARMFUL_QUESTION
    max_p_harmful: float = 0.5
    method: str = "auto"  # as compare's: "logprobs", "parsed", or "auto"
    roles: tuple[str, ...] = ("judge",)

    async def process(self, row: Row, ctx: StageContext) -> Processed:
        judge = ctx.backends["judge"]
        compare = Compare(method=self.method)  # swap: both orders, always
        messages, initial = row["messages"], row["response"]
        principles = [ctx.constitution.principle(r["principle_id"]) for r in row["rounds"]]
        asks = [
            self._prefer(compare, messages, self._judged_under(p), r["revision"], initial, judge)
            for p, r in zip(principles, row["rounds"])
        ]
        if self.helpfulness:
            helpful = Principle(id="helpfulness", critique="", revision="", comparison=self.helpfulness_question)
            asks += [
                self._prefer(compare, messages, helpful, row["revision"], initial, judge),
                self._p_harmful(messages, judge),
            ]
        try:
            results = await asyncio.gather(*asks)
        except BackendCallError as exc:
            raise RowFailed(str(exc)) from None
        tokens = sum(t for _, t in results)
        gains = [
            {**g, "question": "principle" if p.comparison else "default"} for p, (g, _) in zip(principles, results)
        ]
        check: dict[str, Any] = {"p_revision": gains[-1]["p_revision"]}
        if self.helpfulness:
            (helpfulness, _), (harm, _) = results[-2:]
            p_harmful = harm["p_harmful"]
            check.update(
                p_harmful=p_harmful,
                harmful_consistent=harm["position_consistent"],
                harmless=None if p_harmful is None else p_harmful < self.max_p_harmful,
                helpfulness=helpfulness,
            )
        check["flags"] = gate_flags(
            check["p_revision"],
            self.min_p_revision,
            check.get("p_harmful"),
            self.max_p_harmful,
            check.get("helpfulness", {}).get("p_revision"),
            self.min_p_helpful,
        )
        out = {
            **row,
            "rounds": [{**r, "gain": g} for r, g in zip(row["rounds"], gains)],
            "revision_check": check,
            "flags": [*row.get("flags", []), *check["flags"]],
            "models": {**row.get("models", {}), "judge": ctx.models["judge"]},
        }
        return Processed(out, tokens)

    def _judged_under(self, principle: Principle) -> Principle:
        return principle if principle.comparison else replace(principle, comparison=self.default_comparison)

    @staticmethod
    async def _prefer(
        compare: Compare, messages, principle: Principle, first: str, second: str, judge
    ) -> tuple[dict[str, Any], int]:
        """P(first better) (first: the revision) under one principle, both orders swap-averaged, by the
        compare stage's own votes."""
        ballots = [Ballot(principle, first, second), Ballot(principle, second, first, swapped=True)]
        tokens = sum(await asyncio.gather(*(compare.vote(b, messages, judge) for b in ballots)))
        label = compare.label([b.record() for b in ballots])
        return {
            "p_revision": label["p_first"],
            "position_consistent": label["position_consistent"],
            "method": label["method"],
        }, tokens

    async def _p_harmful(self, messages, judge) -> tuple[dict[str, Any], int]:
        """P(the request is harmful): yes/no under the letters A/B and then B/A, averaged, so a judge's
        pull towards one letter cancels out as it does in a swapped comparison. Read from option
        log-probabilities only: under `method: parsed` the request gets no verdict (no refusal flag)."""
        if self.method == "parsed":
            return {"p_harmful": None, "position_consistent": None}, 0
        conversation = conversation_text(messages)

        async def p_yes(first: str, second: str, yes: str) -> float | None:
            content = CLASSIFY_TEMPLATE.format(
                conversation=conversation,
                question=self.harmful_question,
                first=first,
                second=second,
                instruction=ANSWER_INSTRUCTION,
            )
            probs = feedback.normalise(
                await judge.choice_logprobs(ChatRequest(messages=({"role": "user", "content": content},)), OPTIONS),
                OPTIONS,
            )
            return None if probs is None else probs[yes]

        shown_first, shown_second = await asyncio.gather(p_yes("yes", "no", "A"), p_yes("no", "yes", "B"))
        if shown_first is None or shown_second is None:
            return {"p_harmful": None, "position_consistent": None}, 0
        return {
            "p_harmful": feedback.swap_average(shown_first, shown_second),
            "position_consistent": feedback.position_consistent(shown_first, shown_second),
        }, 0


@register("revision_check")
def build(params: dict[str, Any]) -> RevisionCheck:
    return RevisionCheck(**params)
