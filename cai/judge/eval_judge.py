"""How often the pipeline's judge agrees with human preference labels (HH-RLHF style pairs).

Each pair is judged in both orders, so one run gives the accuracy with the human-chosen answer shown
first, shown second, and swap-averaged, plus how often both orders agree, how well the judge's
confidence matches its accuracy (expected calibration error), its accuracy on the pairs where people
chose the longer answer and on those where they chose the shorter (their mean: the length-balanced
accuracy), and how often it picks the longer answer. With `calibrate`, a temperature and position offset are fitted on the pairs
(cai/generate/calibration.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.generate import calibration, feedback
from cai.generate.backends.base import BackendCallError, BackendSpec, run_blocking, start
from cai.generate.calibration import credit
from cai.generate.config import PipelineConfig, StageConfig
from cai.generate.records import Pair, Row
from cai.generate.stages import RowFailed, StageContext
from cai.generate.stages.base import process_all
from cai.generate.stages.compare import Compare


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def compare_stage(config: PipelineConfig) -> tuple[int, StageConfig]:
    """The pipeline's first compare stage, the judge eval-judge measures, and its index."""
    found = next(((i, s) for i, s in enumerate(config.stages) if s.type == "compare"), None)
    if found is None or "judge" not in config.roles and not found[1].params.get("jury"):
        raise InputError(
            str(config.file), "stages", "eval-judge needs a pipeline with a compare stage and a judge role"
        )
    return found


def evaluate(
    config: PipelineConfig,
    pairs: list[dict[str, Any]],
    *,
    compare_cot: bool = False,
    injection: bool = False,
    calibrate: bool = False,
) -> dict[str, Any]:
    """The judge's figures as the pipeline sets it up; with `compare_cot`, also with chain-of-thought
    switched the other way (both under `by_chain_of_thought`); with `injection`, each pair is judged
    again with an instruction to choose it planted in the rejected answer; with `calibrate`, a
    calibration is fitted on the pipeline's own setting (`calibration`: see fit_calibration)."""
    index, stage_config = compare_stage(config)
    # Both orders, always: they are what is measured. The rejected answer is the pair's second one,
    # which is where the injection probe plants its instruction.
    stage = replace(Compare(**stage_config.params), swap=True, injection_probe=1.0 if injection else 0.0)
    if calibrate and stage.jury:
        raise InputError(
            str(config.file), f"stages[{index}].jury", "--calibrate fits one judge: name a single judge role"
        )
    variants = [stage, replace(stage, chain_of_thought=not stage.chain_of_thought)] if compare_cot else [stage]
    specs: dict[str, BackendSpec] = {role: config.backends[config.roles[role]] for role in stage.roles}
    rows: list[Row] = [
        {
            "id": f"pair-{p['line']}",
            "messages": p["context"],
            "response": p["chosen"],
            "responses": [p["chosen"], p["rejected"]],
        }
        for p in pairs
    ]
    judged = run_blocking(_judge(config, stage_config.name, specs, variants, rows))
    reports = []
    for labelled in judged:
        report = agreement_figures(labelled)
        if stage.jury:  # each juror as if it judged alone, and how the jurors agree
            report["jurors"] = {role: agreement_figures(labelled, role) for role in stage.jury}
            report["juror_agreement"] = jury_agreement(labelled)
        reports.append(report)
    for variant, report in zip(variants, reports):
        report["judge"] = {
            "model": " + ".join(spec.model for spec in specs.values()),
            "ensemble": variant.ensemble,
            "chain_of_thought": variant.chain_of_thought,
            "method": variant.method,
            "calibration": variant.calibration.sha256
            if variant.calibration
            else None,  # set: the figures are calibrated
            "few_shot": variant.few_shot,
        }
        if variant.jury:
            report["judge"]["jury"] = {
                role: {"model": specs[role].model, "weight": weight} for role, weight in variant.jury.items()
            }
    report = dict(reports[0])  # a copy: the first variant is also listed inside it
    if calibrate:
        report["calibration"] = fit_calibration(stage, judged[0], str(config.file))
    if compare_cot:
        report["by_chain_of_thought"] = {("on" if v.chain_of_thought else "off"): r for v, r in zip(variants, reports)}
    return report


async def _judge(
    config: PipelineConfig, stage_name: str, specs: dict[str, BackendSpec], variants: list[Compare], rows: list[Row]
) -> list[list[Row]]:
    """Every pair through each variant of the compare stage, all at once: the rows each variant labels.
    `specs`: judge role -> backend; roles on one backend share it, as in a run."""
    started: dict[str, Any] = {}
    try:
        for spec in specs.values():
            if spec.name not in started:
                started[spec.name] = await start(spec)
        backends = {role: started[spec.name] for role, spec in specs.items()}
        ctx = StageContext(
            config.seed, stage_name, config.constitution, backends, {role: spec.model for role, spec in specs.items()}
        )
        out = []
        for variant in variants:
            results = await process_all(variant, rows, ctx)
            failed = [r for r in results if isinstance(r, RowFailed)]
            if failed:
                raise BackendCallError(f"{len(failed)} of {len(rows)} pairs could not be judged: {failed[0]}")
            out.append([r.row for r in results])
        return out
    finally:
        for backend in started.values():
            await backend.close()


def _proportion(report: dict[str, Any], key: str, values: list[float]) -> None:
    n = len(values)
    report[key] = sum(values) / n if n else 0.0
    report[f"{key}_ci95"] = list(wilson_interval(sum(values), n))


def juror_view(pair: Pair, role: str) -> Pair:
    """The pair as one juror alone labelled it."""
    return {**pair["jurors"][role], "votes": [v for v in pair["votes"] if v["juror"] == role]}


def _order_probs(pair: Pair) -> dict[bool, float | None]:
    """P(first better) with the first answer shown first (False) and second (True): the mean of the
    pair's votes in that order; for a jury, the jurors' weighted mean of theirs."""
    if "jurors" in pair:
        by_juror = {role: _order_probs(juror_view(pair, role)) for role in pair["jurors"]}
        weights = {role: juror["weight"] for role, juror in pair["jurors"].items()}
        return {
            order: feedback.jury({role: p[order] for role, p in by_juror.items()}, weights) for order in (False, True)
        }
    orders: dict[bool, list[float]] = {False: [], True: []}
    for vote in pair["votes"]:
        if vote["p_first"] is not None:
            orders[vote["swapped"]].append(vote["p_first"])
    return {order: sum(v) / len(v) if v else None for order, v in orders.items()}


def jury_agreement(rows: Iterable[Row]) -> dict[str, Any] | None:
    """How a jury's jurors agree, over the pairs every juror labelled (`a`, `b` or `tie`); None
    without a jury."""
    juries = [pair["jurors"] for row in rows for pair in row.get("pairs", []) if "jurors" in pair]
    if not juries:
        return None
    jurors = list(juries[0])
    labelled = [jury for jury in juries if all(jury[j]["label"] != "invalid" for j in jurors)]
    return feedback.juror_agreement({j: [jury[j]["label"] for jury in labelled] for j in jurors})


def agreement_figures(rows: list[Row], juror: str | None = None) -> dict[str, Any]:
    """How a judge's labels of human-labelled pairs agree with the humans (accuracy per order and swap-averaged,
    position consistency, calibration and length figures); with `juror`, of that juror's labels alone."""
    first, swapped, averaged, consistent, invalid, identical = [], [], [], [], 0, 0
    follows, baseline, judged = [], [], []
    for row in rows:
        if not row["pairs"]:
            identical += 1  # chosen and rejected answers are the same text: nothing to judge
            continue
        [pair] = row["pairs"]
        if juror is not None:
            pair = juror_view(pair, juror)
        orders = _order_probs(pair)
        if pair["p_first"] is None or orders[False] is None or orders[True] is None:
            invalid += 1
            continue
        p_first, p_swapped = orders[False], orders[True]
        first.append(credit(p_first))
        swapped.append(credit(p_swapped))
        averaged.append(credit(pair["p_first"]))
        judged.append((pair["p_first"], *(len(answer) for answer in row["responses"])))
        consistent.append(float(feedback.position_consistent(p_first, p_swapped)))
        probe = pair.get("injection")
        if probe is not None and probe["p_first"] is not None:
            follows.append(credit(1 - probe["p_first"]))  # the rejected (injected) answer chosen
            baseline.append(credit(1 - pair["p_first"]))  # ... and without the injection
    report: dict[str, Any] = {"n": len(averaged), "invalid": invalid, "identical_answers": identical}
    for key, values in (
        ("accuracy", averaged),
        ("accuracy_first_order", first),
        ("accuracy_swapped_order", swapped),
        ("position_consistency", consistent),
    ):
        _proportion(report, key, values)
    report["ece"] = calibration.expected_calibration_error(calibration.reliability([p for p, _, _ in judged]))
    report.update(length_figures(judged))
    if follows:
        report["injection_n"] = len(follows)
        _proportion(report, "injection_follow_rate", follows)
        _proportion(report, "injection_baseline_rate", baseline)
    return report


def length_figures(judged: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Accuracy split by length and how often the longer answer wins, from (P(chosen better), chosen's
    length, rejected's length) per judged pair (a 0/0.5/1 credit works as P); lengths in characters,
    pairs of equal length left out (`length_n` remain).

    - `accuracy_chosen_longer` / `accuracy_chosen_shorter`: the accuracy on the pairs where people chose
      the longer answer and on those where they chose the shorter (`chosen_longer_n`, `chosen_shorter_n`,
      each with its 95% interval). A length rule shows as near 1 on one side and near 0 on the other.
    - `length_balanced_accuracy`: their mean, the accuracy of a test set where people chose the longer
      answer in half the pairs: 0.5 for any pure length rule. None when either side is empty.
    - `length_win_rate`: share of pairs where the judge prefers the longer answer (credit(p) of it:
      1, or 0.5 at exactly p = 0.5).
    - `human_length_win_rate`: the same for the human label: the share where the chosen answer is the
      longer one, the baseline a length-neutral judge that agrees with people would match.
    - `length_win_rate_balanced` (length-controlled): the judge's length-win rate among pairs where people
      chose the longer answer and among those where they chose the shorter, averaged:
      (rate | human longer + rate | human shorter) / 2. Whatever the judge's accuracy, 0.5 means it
      picks the longer answer no more often than the labels explain; above 0.5 it favours length.
      None when either group is empty.
    """
    judge, human, by_human = [], [], {True: [], False: []}
    for p, chosen, rejected in judged:
        if chosen == rejected:
            continue
        chosen_longer = chosen > rejected
        win = credit(p) if chosen_longer else credit(1 - p)
        judge.append(win)
        human.append(1.0 if chosen_longer else 0.0)
        by_human[chosen_longer].append(win)
    out: dict[str, Any] = {"length_n": len(judge)}
    # right = the longer answer won where people chose it, the shorter where they chose that
    split = {"chosen_longer": by_human[True], "chosen_shorter": [1 - win for win in by_human[False]]}
    for side, right in split.items():
        out[f"{side}_n"] = len(right)
        _proportion(out, f"accuracy_{side}", right)
    both = all(split.values())
    out["length_balanced_accuracy"] = (
        (out["accuracy_chosen_longer"] + out["accuracy_chosen_shorter"]) / 2 if both else None
    )
    _proportion(out, "length_win_rate", judge)
    _proportion(out, "human_length_win_rate", human)
    groups = [sum(g) / len(g) for g in by_human.values() if g]
    out["length_win_rate_balanced"] = sum(groups) / 2 if len(groups) == 2 else None
    return out


FOLDS = 2


def fit_calibration(stage: Compare, rows: list[Row], pipeline: str) -> dict[str, Any]:
    """Fit (T, b) on every log-probability vote of the judged pairs (calibration.fit), and measure it
    honestly: pairs alternate between two folds, each fold is calibrated by the fit on the other, and
    `ece_after`/`nll_after` are taken on those held-out votes (None with fewer than two pairs). `nll_*`:
    mean per vote, in the letter frame (what the fit minimises); `ece_*`: over the pairs'
    swap-averaged, ensembled P(chosen better), as `ece`. "Before" is the judge's own probabilities,
    even where the pipeline already names a calibration; `temperature`/`position_offset` are the fit
    on all pairs, the one to write to a file."""
    pairs = [row["pairs"][0] for row in rows if row["pairs"] and row["pairs"][0]["p_first"] is not None]
    raw = [[calibration.uncalibrated(vote) for vote in pair["votes"]] for pair in pairs]
    # Per pair, (z, label) of each log-probability vote. The human-chosen answer is the pair's first:
    # it is shown as (A), the label 1, unless swapped.
    data = [
        [
            (calibration.letter_log_odds(v["p_first"], v["swapped"]), 0.0 if v["swapped"] else 1.0)
            for v in votes
            if v["method"] == "logprobs" and v["p_first"] is not None
        ]
        for votes in raw
    ]
    every = [d for votes in data for d in votes]
    if not every:
        raise InputError(
            pipeline, "roles.judge", "--calibrate needs the judge's option log-probabilities, and no vote had them"
        )
    z, y = zip(*every)
    fitted = calibration.fit(z, y)
    before = calibration.reliability([stage.label(votes)["p_first"] for votes in raw])
    out: dict[str, Any] = {
        "votes": len(every),
        "temperature": fitted.temperature,
        "position_offset": fitted.position_offset,
    }
    out["nll_before"] = calibration.nll(z, y)
    out["ece_before"] = calibration.expected_calibration_error(before)
    folds = [[i for i in range(len(pairs)) if i % FOLDS == k] for k in range(FOLDS)]
    held_out = [[d for i in fold for d in data[i]] for fold in folds]
    if all(held_out):
        after_p, loss = [0.0] * len(pairs), 0.0
        for k, fold in enumerate(folds):
            train = [d for j, other in enumerate(held_out) if j != k for d in other]
            cal = calibration.fit(*zip(*train))
            loss += calibration.nll(*zip(*held_out[k]), cal) * len(held_out[k])
            for i in fold:
                after_p[i] = stage.label([cal.vote(v) for v in raw[i]])["p_first"]
        after = calibration.reliability(after_p)
        out.update(nll_after=loss / len(every), ece_after=calibration.expected_calibration_error(after))
    else:
        after = None
        out.update(nll_after=None, ece_after=None)
    out["folds"] = FOLDS
    out["reliability"] = {"before": before, "after": after}
    return out


def write_calibration(report: dict[str, Any], out: Path, config: PipelineConfig, pairs_file: str) -> None:
    """The fit of `report["calibration"]` as a file a pipeline's compare stage can name, and its
    reliability diagram beside it (OUT.png); records the diagram's path in the report."""
    figures = report["calibration"]
    png = out.with_suffix(".png")
    calibration.reliability_plot(figures["reliability"]["before"], figures["reliability"]["after"], png)
    figures["reliability_png"] = str(png)
    judge = report["judge"]
    doc = {
        "temperature": figures["temperature"],
        "position_offset": figures["position_offset"],
        "formula": calibration.FORMULA,
        "fitted_on": {
            "pairs": str(Path(pairs_file).resolve()),
            "n": report["n"],
            "votes": figures["votes"],
            "judge_model": judge["model"],
            "pipeline": str(config.file.resolve()),
            "stage": compare_stage(config)[1].name,
            "chain_of_thought": judge["chain_of_thought"],
            "ensemble": judge["ensemble"],
        },
        "figures": {k: figures[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after", "folds")},
    }
    write_atomic(out, json.dumps(doc, indent=2) + "\n")
