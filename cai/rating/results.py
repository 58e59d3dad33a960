"""From a run's answers and judgments to its ratings: `ratings.json` (the contract below), `ratings.csv`,
the sample comparisons the report shows, and the report.

ratings.json = {"name", "baseline", "judge", "models": {MODEL: {"series", "step", "model"}},
"axes": {AXIS: {"n_prompts", "position_consistency", "n_comparisons", "invalid", "identical",
"models": {MODEL: {"elo", "ci95": [lo, hi], "win_rate_vs_baseline", "win_rate_ci95": [lo, hi],
"lc_win_rate_vs_baseline", "refusal_rate", "n_comparisons", "mean_length", "n_answers"}}}}}
Win rates are soft (the mean of the judge's P(model better) over its comparisons with the baseline, as
AlpacaEval's), with Wilson intervals; None for the baseline itself and for a model never compared with it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cai.core.disk import write_atomic
from cai.generate.prompts import Prompt
from cai.generate.store import Location, ShardReader
from cai.judge.eval_judge import wilson_interval
from cai.judge.report import EVAL_RATINGS
from cai.rating import ratings as maths
from cai.rating.config import EvalConfig
from cai.rating.units import Judgment, answer_id

RATINGS, RATINGS_CSV, SAMPLES = EVAL_RATINGS, "ratings.csv", "samples.json"
SAMPLES_PER_PAIR = 3  # prompts shown side by side per axis and model pair in the report
CSV_COLUMNS = (
    "axis",
    "model",
    "elo",
    "ci95_low",
    "ci95_high",
    "win_rate_vs_baseline",
    "win_rate_ci95_low",
    "win_rate_ci95_high",
    "lc_win_rate_vs_baseline",
    "refusal_rate",
    "n_comparisons",
    "mean_length",
)


def rate(
    config: EvalConfig,
    prompts: dict[str, list[Prompt]],
    judgments: list[Judgment],
    answers: dict[str, Location],
    judged: dict[str, Location],
    reader: ShardReader,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ratings of every axis from the judgments planned and made, and the sample comparisons."""
    out: dict[str, Any] = {
        "name": config.name,
        "baseline": config.baseline,
        "judge": {
            "models": {role: spec.model for role, spec in config.judges.items()},
            "ensemble": config.judge.ensemble,
            "jury": dict(config.judge.jury) if config.judge.jury else None,
            "calibration": config.judge.calibration.sha256 if config.judge.calibration else None,
        },
        "models": {
            m.name: {"series": m.series, "step": m.step, "model": m.backend.model} for m in config.models.values()
        },
        "axes": {},
    }
    samples: list[dict[str, Any]] = []
    for axis, axis_prompts in prompts.items():
        texts: dict[str, dict[str, str]] = {m: {} for m in config.models}  # model -> prompt id -> answer
        for prompt in axis_prompts:
            for name, model in config.models.items():
                location = answers.get(answer_id(config, prompt, model))
                if location is not None:
                    texts[name][prompt.id] = reader.read(location)["answer"]
        comparisons, consistent, invalid, identical = [], [], 0, 0
        shown: dict[tuple[str, str], int] = {}
        by_id = {p.id: p for p in axis_prompts}
        for j in (j for j in judgments if j.axis == axis and j.id in judged):
            record = reader.read(judged[j.id])
            if record["p_first"] is None:
                invalid += 1
                continue
            first, second = j.models
            lengths = [len(texts[m].get(j.prompt.id, "")) for m in j.models]
            comparisons.append(maths.Comparison(j.prompt.id, first, second, record["p_first"], *lengths))
            identical += bool(record.get("identical"))
            if record.get("position_consistent") is not None:
                consistent.append(record["position_consistent"])
            if shown.get(j.models, 0) < SAMPLES_PER_PAIR:
                shown[j.models] = shown.get(j.models, 0) + 1
                samples.append(
                    {
                        "axis": axis,
                        "prompt": [dict(m) for m in by_id[j.prompt.id].messages],
                        "models": list(j.models),
                        "answers": [texts[m].get(j.prompt.id, "") for m in j.models],
                        "p_first": record["p_first"],
                        "position_consistent": record.get("position_consistent"),
                    }
                )
        out["axes"][axis] = {
            "n_prompts": len(axis_prompts),
            "question": config.axes[axis].question,
            "position_consistency": sum(consistent) / len(consistent) if consistent else None,
            "n_comparisons": len(comparisons),
            "invalid": invalid,
            "identical": identical,
            "models": axis_figures(config, axis, comparisons, texts),
        }
    return out, samples


def axis_figures(
    config: EvalConfig, axis: str, comparisons: list[maths.Comparison], texts: dict[str, dict[str, str]]
) -> dict[str, dict[str, Any]]:
    """Each model's figures on one axis. A model without a comparison gets no rating (None), and is left
    out of the fit rather than pinned at the baseline's."""
    compared = [m for m in config.models if m == config.baseline or any(m in (c.first, c.second) for c in comparisons)]
    theta = maths.bradley_terry(comparisons, compared, config.baseline, ridge=maths.RIDGE)
    intervals = maths.bootstrap_elo(
        comparisons, compared, config.baseline, rounds=config.bootstrap, seed=config.seed, ridge=maths.RIDGE
    )
    controlled = maths.length_controlled_win_rates(comparisons, compared, config.baseline)
    out = {}
    for name in config.models:
        answers = list(texts[name].values())
        figures: dict[str, Any] = {
            "elo": None,
            "ci95": None,
            "win_rate_vs_baseline": None,
            "win_rate_ci95": None,
            "lc_win_rate_vs_baseline": controlled.get(name),
            "refusal_rate": sum(map(maths.refuses, answers)) / len(answers) if answers else None,
            "n_comparisons": sum(name in (c.first, c.second) for c in comparisons),
            "mean_length": sum(map(len, answers)) / len(answers) if answers else None,
            "n_answers": len(answers),
        }
        if name in theta:
            figures["elo"] = maths.elo(theta[name])
            figures["ci95"] = list(intervals[name])
        wins = [p for p, _, _ in maths.versus(comparisons, name, config.baseline)]
        if wins:
            figures["win_rate_vs_baseline"] = sum(wins) / len(wins)
            figures["win_rate_ci95"] = list(wilson_interval(sum(wins), len(wins)))
        out[name] = figures
    return out


def write(run_dir: Path, ratings: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """ratings.json, ratings.csv and samples.json, each atomically."""
    write_atomic(run_dir / RATINGS, json.dumps(ratings, indent=2) + "\n")
    write_atomic(run_dir / SAMPLES, json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    text = io.StringIO()
    table = csv.writer(text, lineterminator="\n")
    table.writerow(CSV_COLUMNS)
    for axis, figures in ratings["axes"].items():
        for model, f in figures["models"].items():
            low, high = f["ci95"] or (None, None)
            win_low, win_high = f["win_rate_ci95"] or (None, None)
            row = [axis, model, f["elo"], low, high, f["win_rate_vs_baseline"], win_low, win_high]
            row += [f["lc_win_rate_vs_baseline"], f["refusal_rate"], f["n_comparisons"], f["mean_length"]]
            table.writerow(["" if v is None else v for v in row])
    write_atomic(run_dir / RATINGS_CSV, text.getvalue())
