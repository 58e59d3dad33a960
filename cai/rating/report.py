"""RUN_DIR/report.html of an eval: per axis a leaderboard, the harmlessness-vs-helpfulness frontier (the
Constitutional AI paper's figure: a point per model with its intervals, a training run's checkpoints
joined in step order), the sample comparisons side by side, and what each invocation did."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from cai.core.disk import replaced_folder, write_atomic
from cai.judge.report import embedded_plots, html_page, html_table
from cai.rating.results import RATINGS, SAMPLES

FRONTIER = "frontier"  # report/frontier.png: also shown by a chain's report


def frontier_axes(ratings: dict[str, Any]) -> tuple[str, str] | None:
    """(x, y) of the frontier plot: helpfulness across, harmlessness up, as the paper draws it; else the
    second axis across and the first up. None with a single axis."""
    axes = list(ratings["axes"])
    if len(axes) < 2:
        return None
    if {"helpful", "harmless"} <= set(axes):
        return "helpful", "harmless"
    return axes[1], axes[0]


def _plots(ratings: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    chosen = frontier_axes(ratings)
    series: dict[str, list[str]] = {}
    for name, model in ratings["models"].items():
        series.setdefault(model["series"], []).append(name)
    if chosen is not None:
        x_axis, y_axis = chosen
        fig, ax = plt.subplots(figsize=(6, 5))
        for names in series.values():
            points = [
                (ratings["axes"][x_axis]["models"][n], ratings["axes"][y_axis]["models"][n], n)
                for n in names
                if ratings["axes"][x_axis]["models"][n]["elo"] is not None
                and ratings["axes"][y_axis]["models"][n]["elo"] is not None
            ]
            if not points:
                continue
            xs = [x["elo"] for x, _, _ in points]
            ys = [y["elo"] for _, y, _ in points]
            xerr = [[x["elo"] - x["ci95"][0] for x, _, _ in points], [x["ci95"][1] - x["elo"] for x, _, _ in points]]
            yerr = [[y["elo"] - y["ci95"][0] for _, y, _ in points], [y["ci95"][1] - y["elo"] for _, y, _ in points]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-" if len(points) > 1 else "o", capsize=3, alpha=0.85)
            for x, y, (_, _, name) in zip(xs, ys, points):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"{x_axis} Elo")
        ax.set_ylabel(f"{y_axis} Elo")
        ax.set_title(f"{y_axis} vs {x_axis} (baseline {ratings['baseline']} at 1000; 95% intervals)")
        fig.tight_layout()
        fig.savefig(folder / f"{FRONTIER}.png", dpi=100)
        plt.close(fig)
        written[FRONTIER] = f"{FRONTIER}.png"
    for axis, figures in ratings["axes"].items():
        rated = [(n, f) for n, f in figures["models"].items() if f["elo"] is not None]
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(rated) + 1.5))
        ax.errorbar(
            [f["elo"] for _, f in rated],
            range(len(rated)),
            xerr=[[f["elo"] - f["ci95"][0] for _, f in rated], [f["ci95"][1] - f["elo"] for _, f in rated]],
            fmt="o",
            capsize=3,
        )
        ax.set_yticks(range(len(rated)), [n for n, _ in rated])
        ax.axvline(1000, color="#999", linewidth=0.8)
        ax.set_xlabel(f"{axis} Elo (95% interval)")
        fig.tight_layout()
        fig.savefig(folder / f"elo-{axis}.png", dpi=100)
        plt.close(fig)
        written[f"elo-{axis}"] = f"elo-{axis}.png"
    return written


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}%"
    return text + (f" ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})" if interval else "")


def _leaderboard(axis: str, figures: dict[str, Any], baseline: str) -> str:
    order = sorted(
        figures["models"].items(), key=lambda item: -(item[1]["elo"] if item[1]["elo"] is not None else -1e9)
    )
    rows = []
    for name, f in order:
        elo = "-" if f["elo"] is None else f"{f['elo']:.0f} ({f['ci95'][0]:.0f}-{f['ci95'][1]:.0f})"
        rows.append(
            [
                html.escape(name) + (" (baseline)" if name == baseline else ""),
                elo,
                _rate(f["win_rate_vs_baseline"], f["win_rate_ci95"]),
                _rate(f["lc_win_rate_vs_baseline"]),
                _rate(f["refusal_rate"]),
                f["n_comparisons"],
                _number(f["mean_length"]),
            ]
        )
    consistency = _rate(figures["position_consistency"])
    question = figures.get("question") or "the constitution's comparison principles"
    return "\n".join(
        [
            f"<h2>{html.escape(axis)}</h2>",
            f"<p>{figures['n_prompts']} prompts, {figures['n_comparisons']} comparisons judged under "
            f"{html.escape(question)} ({figures['invalid']} without a usable verdict, {figures['identical']} of equal answers, "
            f"counted as ties); the judge's position consistency: {consistency}.</p>",
            html_table(
                [
                    "model",
                    "Elo (95% CI)",
                    f"win rate vs {baseline} (95% CI)",
                    "length-controlled win rate",
                    "refusals",
                    "comparisons",
                    "mean length (chars)",
                ],
                rows,
            ),
        ]
    )


def _samples(samples: list[dict[str, Any]]) -> str:
    e = html.escape
    parts = ["<h2>Sample comparisons</h2>"]
    for s in samples:
        prompt = "<br>".join(f"<b>{e(m['role'])}</b>: {e(m['content'])}" for m in s["prompt"])
        first, second = s["models"]
        parts.append(
            f"<h3>{e(s['axis'])}: {e(first)} vs {e(second)}</h3><p>{prompt}</p>"
            f"<p>P({e(first)} better) = {s['p_first']:.3f}"
            + ("" if s["position_consistent"] is None else f", position consistent: {s['position_consistent']}")
            + "</p>"
            + html_table([first, second], [[f"<pre>{e(a)}</pre>" for a in s["answers"]]])
        )
    return "\n".join(parts)


def _invocations(manifest: dict[str, Any]) -> str:
    rows = []
    for run in manifest["invocations"]:
        if "seconds" not in run:
            continue  # killed before it ended
        answers, judgments = run["answers"], run["judgments"]
        rows.append(
            [
                html.escape(run["started"]),
                f"{run['seconds']:.1f}",
                f"{answers['new']} ({answers['failed']} failed)",
                f"{judgments['new']} ({judgments['failed']} failed)",
                judgments["calls"],
                run["cached_calls"],
            ]
        )
    header = ["started", "seconds", "new answers", "new judgments", "judge calls", "calls replayed from cache"]
    return "<h2>Invocations</h2>" + html_table(header, rows)


def write(run_dir: Path) -> Path:
    """RUN_DIR/report.html (its plots inside it, and in RUN_DIR/report/)."""
    ratings = json.loads((run_dir / RATINGS).read_text(encoding="utf-8"))
    samples = json.loads((run_dir / SAMPLES).read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    with replaced_folder(run_dir / "report") as tmp:
        plots = embedded_plots(tmp, _plots(ratings, tmp))
    judge = ratings["judge"]
    models = ", ".join(f"{html.escape(role)}: {html.escape(model)}" for role, model in judge["models"].items())
    parts = [
        f"<h1>cai eval: {html.escape(ratings['name'])}</h1>",
        f"<p>Bradley-Terry ratings from the judge's soft labels (both orders, {judge['ensemble']} principle(s) per "
        f"prompt; judge {models}), on the Elo scale with {html.escape(ratings['baseline'])} at 1000; intervals by "
        "bootstrap over prompts. Win rates are the mean P(model better) over its comparisons with the baseline.</p>",
    ]
    if FRONTIER in plots:
        parts.append(f'<img src="{plots[FRONTIER]}" alt="frontier">')
    for axis, figures in ratings["axes"].items():
        parts.append(_leaderboard(axis, figures, ratings["baseline"]))
        parts.append(f'<img src="{plots[f"elo-{axis}"]}" alt="{html.escape(axis)} Elo">')
    parts += [_invocations(manifest), _samples(samples)]
    page = run_dir / "report.html"
    write_atomic(page, html_page(f"cai eval: {ratings['name']}", parts))
    return page
