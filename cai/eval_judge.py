"""How often the pipeline's judge agrees with human preference labels (HH-RLHF style pairs).

Each pair is judged in both orders, so one run gives the accuracy with the human-chosen answer shown
first, shown second, and swap-averaged, plus how often both orders agree.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from cai.backends.base import BackendCallError, run_blocking, start
from cai.config import PipelineConfig
from cai.errors import InputError
from cai.files import jsonl_records, read_text
from cai.importers import transcript_to_messages
from cai.stages import RowFailed, StageContext
from cai.stages.base import process_all
from cai.stages.compare import Compare


def load_pairs(path: str | Path, limit: int | None = None, skip: int = 0) -> list[dict[str, Any]]:
    """`{"chosen", "rejected"}` transcripts -> the shared context and the two final assistant answers;
    the first `skip` records are passed over unchecked (pairs 801-1000: skip 800, limit 200)."""
    file = str(path)
    pairs = []
    for index, (lineno, obj) in enumerate(jsonl_records(file, read_text(path))):
        if index < skip:
            continue
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("chosen", "rejected")):
            raise InputError(file, None, "expected an object with 'chosen' and 'rejected' transcripts", line=lineno)
        chosen, rejected = _turns(obj["chosen"]), _turns(obj["rejected"])
        for key, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise InputError(file, key, "the transcript must end with an Assistant turn after a Human turn", line=lineno)
        pairs.append({"line": lineno, "context": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]})
        if limit is not None and len(pairs) == limit:
            break
    if not pairs:
        raise InputError(file, None, f"no pairs after the {skip} skipped" if skip else "no pairs in file")
    return pairs


def _turns(transcript: str) -> list[dict[str, str]]:
    messages = transcript_to_messages(transcript)
    if transcript.rstrip().endswith("Assistant:"):
        messages.append({"role": "assistant", "content": ""})  # HH has empty final answers, sometimes the chosen one
    return messages


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _credit(p: float) -> float:
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def evaluate(config: PipelineConfig, pairs: list[dict[str, Any]], *, compare_cot: bool = False, injection: bool = False) -> dict[str, Any]:
    """The judge's figures as the pipeline sets it up; with `compare_cot`, also with chain-of-thought
    switched the other way (both under `by_chain_of_thought`); with `injection`, each pair is judged
    again with an instruction to choose it planted in the rejected answer."""
    stage_config = next((s for s in config.stages if s.type == "compare"), None)
    if stage_config is None or "judge" not in config.roles:
        raise InputError(str(config.file), "stages", "eval-judge needs a pipeline with a compare stage and a judge role")
    # Both orders, always: they are what is measured. The rejected answer is the pair's second one,
    # which is where the injection probe plants its instruction.
    stage = replace(Compare(**stage_config.params), swap=True, injection_probe=1.0 if injection else 0.0)
    variants = [stage, replace(stage, chain_of_thought=not stage.chain_of_thought)] if compare_cot else [stage]
    spec = config.backends[config.roles["judge"]]
    rows = [{"id": f"pair-{p['line']}", "messages": p["context"], "response": p["chosen"], "responses": [p["chosen"], p["rejected"]]} for p in pairs]
    reports = [_figures(judged) for judged in run_blocking(_judge(config, stage_config.name, spec, variants, rows))]
    for variant, report in zip(variants, reports):
        report["judge"] = {"model": spec.model, "ensemble": variant.ensemble, "chain_of_thought": variant.chain_of_thought, "method": variant.method}
    report = dict(reports[0])  # a copy: the first variant is also listed inside it
    if compare_cot:
        report["by_chain_of_thought"] = {("on" if v.chain_of_thought else "off"): r for v, r in zip(variants, reports)}
    return report


async def _judge(config: PipelineConfig, stage_name: str, spec, variants: list[Compare], rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every pair through each variant of the compare stage, all at once: the rows each variant labels."""
    backend = await start(spec)
    try:
        ctx = StageContext(config.seed, stage_name, config.constitution, {"judge": backend}, {"judge": spec.model})
        out = []
        for variant in variants:
            results = await process_all(variant, rows, ctx)
            failed = [r for r in results if isinstance(r, RowFailed)]
            if failed:
                raise BackendCallError(f"{len(failed)} of {len(rows)} pairs could not be judged: {failed[0]}")
            out.append([r.row for r in results])
        return out
    finally:
        await backend.close()


def _proportion(report: dict[str, Any], key: str, values: list[float]) -> None:
    n = len(values)
    report[key] = sum(values) / n if n else 0.0
    report[f"{key}_ci95"] = list(wilson_interval(sum(values), n))


def _figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first, swapped, averaged, consistent, invalid, identical = [], [], [], [], 0, 0
    follows, baseline = [], []
    for row in rows:
        if not row["pairs"]:
            identical += 1  # chosen and rejected answers are the same text: nothing to judge
            continue
        [pair] = row["pairs"]
        orders: dict[bool, list[float]] = {False: [], True: []}
        for vote in pair["votes"]:
            if vote["p_first"] is not None:
                orders[vote["swapped"]].append(vote["p_first"])
        if pair["p_first"] is None or not orders[False] or not orders[True]:
            invalid += 1
            continue
        p_first, p_swapped = (sum(v) / len(v) for v in (orders[False], orders[True]))
        first.append(_credit(p_first))
        swapped.append(_credit(p_swapped))
        averaged.append(_credit(pair["p_first"]))
        consistent.append(1.0 if (p_first > 0.5) == (p_swapped > 0.5) and p_first != 0.5 and p_swapped != 0.5 else 0.0)
        probe = pair.get("injection")
        if probe is not None and probe["p_first"] is not None:
            follows.append(_credit(1 - probe["p_first"]))  # the rejected (injected) answer chosen
            baseline.append(_credit(1 - pair["p_first"]))  # ... and without the injection
    report: dict[str, Any] = {"n": len(averaged), "invalid": invalid, "identical_answers": identical}
    for key, values in (
        ("accuracy", averaged),
        ("accuracy_first_order", first),
        ("accuracy_swapped_order", swapped),
        ("position_consistency", consistent),
    ):
        _proportion(report, key, values)
    if follows:
        report["injection_n"] = len(follows)
        _proportion(report, "injection_follow_rate", follows)
        _proportion(report, "injection_baseline_rate", baseline)
    return report
