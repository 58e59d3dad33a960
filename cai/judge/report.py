"""`cai report RUN_DIR`: one HTML page (RUN_DIR/report.html, its PNG plots inside it and in RUN_DIR/report/) of what a
run produced and how far its judge can be trusted. The figures come from run_stats.py. For a chain's
workdir, a page with every step: each run's own report, each training's curves and last metrics, each
eval's ratings and plots."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from cai.core.disk import JsonlRecords, replaced_folder, write_atomic
from cai.core.errors import InputError
from cai.generate.records import Row
from cai.generate.stages.compare import Compare
from cai.generate.stages.revision_check import RevisionCheck
from cai.generate.store import RunStore
from cai.judge import report_samples, run_stats

CHAIN_STATE = "chain.json"  # a chain's workdir: the steps done (written by cai/chain.py, read by write_chain)
EVAL_RATINGS = "ratings.json"  # an eval step's ratings (cai/rating/results.py writes it)


def load_run(run_dir: Path) -> tuple[dict[str, Any], JsonlRecords, list[dict[str, Any]]]:
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise InputError(str(run_dir), None, "not a cai run directory (no manifest.json)")
    rows_path = store.datasets_dir / "rows.jsonl"
    if not rows_path.exists():
        raise InputError(str(run_dir), None, "the run has not exported its rows yet: finish it with `cai run` first")
    return manifest, JsonlRecords(rows_path), store.failures()


def _stage_params(manifest: dict[str, Any], stage_type: str) -> dict[str, Any]:
    """The parameters the run's first stage of `stage_type` was declared with ({} without one)."""
    return next((s for s in manifest["config"].get("stages", []) if s.get("type") == stage_type), {})


def _tie_threshold(manifest: dict[str, Any]) -> float:
    return _stage_params(manifest, "compare").get("tie_threshold", Compare.tie_threshold)


def figures(manifest: dict[str, Any], rows: JsonlRecords | list[Row], failures: list[dict[str, Any]]) -> dict[str, Any]:
    compared = any("pairs" in r for r in rows)
    out: dict[str, Any] = {
        "rows": len(rows),
        "failures": run_stats.failure_counts(failures, {r["id"] for r in rows}),
        "revisions": run_stats.revision_stats(rows),
        "revision_gain": run_stats.revision_gain(rows),
        "scores": run_stats.score_values(rows),
    }
    if compared:
        out.update(
            labels=run_stats.label_counts(rows),
            methods=run_stats.method_counts(rows),
            principles=run_stats.by_principle(rows, _tie_threshold(manifest)),
            agreement=run_stats.principle_agreement(rows),
            length=run_stats.length_bias(rows),
            injection=run_stats.injection(rows),
            jury=run_stats.jury(rows),
        )
    return out


# -- plots


def _plots(stats: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write each plot the figures allow; returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
        written[name] = f"{name}.png"

    if "labels" in stats:
        fig, ax = plt.subplots(figsize=(5, 3))
        labels = stats["labels"]
        ax.bar(list(labels), list(labels.values()), color=["#4c72b0", "#55a868", "#c4c4c4", "#c44e52"])
        ax.set_title("labels")
        ax.set_ylabel("pairs")
        save(fig, "labels")

        principles = stats["principles"]
        if principles:
            names = list(principles)
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5), sharey=True)
            consistency = [principles[n]["position_consistency"]["rate"] or 0.0 for n in names]
            left.barh(names, consistency, color="#4c72b0")
            left.set_xlim(0, 1)
            left.set_title("position consistency")
            invalid = [principles[n]["invalid"] for n in names]
            ties = [principles[n]["ties"] for n in names]
            decided = [principles[n]["votes"] - i - t for n, i, t in zip(names, invalid, ties)]
            right.barh(names, decided, color="#55a868", label="decided")
            right.barh(names, ties, left=decided, color="#c4c4c4", label="tie")
            right.barh(names, invalid, left=[d + t for d, t in zip(decided, ties)], color="#c44e52", label="invalid")
            right.set_title("votes")
            right.legend(loc="lower right", fontsize=7)
            save(fig, "principles")

        agreement = stats["agreement"]
        if agreement["principles"]:
            names = agreement["principles"]
            matrix = [[float("nan")] * len(names) for _ in names]
            for key, cell in agreement["pairs"].items():
                x, y = (names.index(p) for p in key.split("|"))
                matrix[x][y] = matrix[y][x] = cell["agree"] / cell["n"]
            fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            fig.colorbar(image, ax=ax, label="agreement")
            ax.set_title("agreement between principles")
            save(fig, "agreement")

        points = stats["length"]["points"]
        if points:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter([r for r, _ in points], [p for _, p in points], s=10, alpha=0.6)
            ax.set_xscale("log")
            ax.axhline(0.5, color="grey", linewidth=0.8)
            ax.axvline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("length of first answer / second")
            ax.set_ylabel("P(first better)")
            ax.set_title("does the longer answer win?")
            save(fig, "length")

    if stats["scores"]:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(stats["scores"], bins=[x / 2 for x in range(2, 22)], color="#4c72b0")
        ax.set_xlabel("expected score (1-10)")
        ax.set_title("direct scores")
        save(fig, "scores")

    revisions = stats["revisions"]
    if revisions:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([a for a, _ in revisions["lengths"]], [b for _, b in revisions["lengths"]], s=10, alpha=0.6)
        top = max([max(a, b) for a, b in revisions["lengths"]] + [1])
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.set_xlabel("initial answer (characters)")
        ax.set_ylabel("revision (characters)")
        ax.set_title("revisions")
        save(fig, "revisions")

    gain = stats.get("revision_gain")
    if gain:
        rounds = list(gain["by_round"])
        wins = [gain["by_round"][k]["wins"] for k in rounds]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        centre = [w["rate"] or 0.0 for w in wins]
        low = [c - w["ci95"][0] for c, w in zip(centre, wins)]
        high = [w["ci95"][1] - c for c, w in zip(centre, wins)]
        ax.errorbar(rounds, centre, yerr=[low, high], marker="o", capsize=4)
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_xticks(rounds)
        ax.set_ylim(0, 1)
        ax.set_xlabel("revision round")
        ax.set_ylabel("revision preferred to the initial answer")
        ax.set_title("revision gain (95% CI)")
        save(fig, "gain")

    if stats["failures"]["recorded"]:
        by_stage = stats["failures"]["by_stage"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(by_stage), list(by_stage.values()), color="#c44e52")
        ax.set_title("failures recorded, by stage")
        save(fig, "failures")
    return written


# -- page

STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px;text-align:left}"
    "img{max-width:100%;display:block;margin:0.5em 0}" + report_samples.STYLE
)


def _pct(r: dict[str, Any]) -> str:
    if r["rate"] is None:
        return "n/a (no cases)"
    low, high = r["ci95"]
    return f"{100 * r['rate']:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%, n={r['n']})"


def _jury(jury: dict[str, Any] | None) -> str:
    if jury is None:
        return ""
    e, agreement = html.escape, jury["agreement"]

    def kappa(k: float | None) -> str:
        return "-" if k is None else f"{k:.2f}"

    rows = [[e(role), e(j["model"]), j["weight"], *j["labels"].values()] for role, j in jury["jurors"].items()]
    pairs = [
        [e(key.replace("|", " / ")), f"{100 * p['agree'] / p['n']:.1f}%" if p["n"] else "-", kappa(p["cohen_kappa"])]
        for key, p in agreement["pairs"].items()
    ]
    share = "-" if agreement["percent_agreement"] is None else f"{100 * agreement['percent_agreement']:.1f}%"
    return "\n".join(
        [
            "<h2>Jury</h2>",
            "<p>Each juror labels every pair; the pair's probability is their weighted mean.</p>",
            html_table(["juror", "model", "weight", *run_stats.LABELS], rows),
            (
                f"<p>Over the {agreement['n']} pairs every juror labelled, two jurors give the same label {share} of the time "
                f"(Fleiss' kappa {kappa(agreement['fleiss_kappa'])}; 0 is chance agreement, 1 full agreement).</p>"
            ),
            html_table(["jurors", "same label", "Cohen's kappa"], pairs),
        ]
    )


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plots: dict[str, str], name: str) -> str:
    return f'<img src="{plots[name]}" alt="{name}">' if name in plots else ""


def embedded_plots(folder: Path, plots: dict[str, str]) -> dict[str, str]:
    """Each plot as a data URI: report.html is one file that reads the same offline, sent by mail or
    opened outside the run folder (the PNGs stay in report/ for those who want the files)."""
    return {
        name: "data:image/png;base64," + base64.b64encode((folder / file).read_bytes()).decode("ascii")
        for name, file in plots.items()
    }


def run_figures(manifest: dict[str, Any]) -> str:
    """What each invocation of the run did: rows, failures, tokens, throughput, time per stage and, for
    backends with declared prices, cost. Invocations that did not finish recorded no figures."""
    runs = [i for i in manifest.get("invocations", []) if "seconds" in i]
    if not runs:
        return ""
    e = html.escape
    rows = []
    for i in runs:
        new = list(i["stages"].values())[-1]["new"] if i["stages"] else 0
        tokens = sum(b["completion_tokens"] for b in i["backends"].values())
        prompt_tokens = sum(b["prompt_tokens"] for b in i["backends"].values())
        costs = [b["cost"] for b in i["backends"].values() if "cost" in b]
        stage_times = ", ".join(f"{e(name)} {s['seconds']:.1f} s" for name, s in i["stages"].items())
        rows.append(
            [
                e(i["started"]),
                f"{new} of {i['rows']}",
                i["failed"],
                tokens,
                prompt_tokens,
                f"{i['seconds']:.1f} s",
                f"{new / i['seconds']:.2f}" if i["seconds"] else "-",
                f"{tokens / i['seconds']:.1f}" if i["seconds"] else "-",
                f"${sum(costs):.4f}" if costs else "-",
                stage_times,
            ]
        )
    parts = [
        "<h2>Run figures</h2>",
        html_table(
            [
                "started",
                "rows finished",
                "failed",
                "tokens generated",
                "prompt tokens",
                "time",
                "rows/s",
                "tok/s",
                "cost",
                "time per stage",
            ],
            rows,
        ),
    ]
    costs = [b["cost"] for i in runs for b in i["backends"].values() if "cost" in b]
    if costs:
        parts.append(
            f"<p>API cost of the run: ${sum(costs):.4f} (from the prices its pipeline declares; calls replayed from the cache cost nothing).</p>"
        )
    return "\n".join(parts)


def _gain_section(manifest: dict[str, Any], gain: dict[str, Any], plots: dict[str, str]) -> list[str]:
    e = html.escape
    params = _stage_params(manifest, "revision_check")
    header = ["judged", "revision wins (P > 0.5)", "mean P(revision better)", "position consistency", "no verdict"]

    def cells(w: dict[str, Any]) -> list[Any]:
        mean = "-" if w["mean_p_revision"] is None else f"{w['mean_p_revision']:.3f}"
        return [w["n"], _pct(w["wins"]), mean, _pct(w["position_consistency"]), w["invalid"]]

    g = gain["gate"]
    min_p = params.get("min_p_revision", RevisionCheck.min_p_revision)
    gate = (
        f"<p>The gate kept {g['kept_out']} of {gain['rows']} rows out of SFT: {g['revision_not_preferred']} whose final revision "
        f"the judge does not prefer to the initial answer (P(revision better) below {min_p}, or no verdict)"
    )
    if g["harmless_requests"] is None:
        gate += "; the helpfulness check is off.</p>"
    else:
        gate += (
            f", {g['refuses_harmless_request']} whose final revision is less helpful than the initial answer to a request "
            f"the judge calls harmless ({g['harmless_requests']} requests called harmless, {g['unclassified_requests']} without a verdict). "
            "A row can have both flags.</p>"
        )
    parts = [
        "<h2>Revision gain</h2>",
        "<p>The judge compares each round's revision with the initial answer under the comparison question of the principle that "
        "round used, in both orders (swap-averaged).</p>",
        html_table(["round", *header], [[k, *cells(w)] for k, w in gain["by_round"].items()]),
        _img(plots, "gain"),
        html_table(["principle", *header], [[e(pid), *cells(w)] for pid, w in gain["by_principle"].items()]),
    ]
    if gain["helpfulness"]:
        parts.append(
            "<p>Final revision more helpful than the initial answer: " + _pct(gain["helpfulness"]["wins"]) + ".</p>"
        )
    return [*parts, gate]


def render(manifest: dict[str, Any], stats: dict[str, Any], plots: dict[str, str], samples: str = "") -> str:
    e = html.escape
    c = manifest["constitution"]
    parts = [
        f"<h1>cai run: {e(manifest['name'])}</h1>",
        html_table(
            ["pipeline", "constitution", "seed", "created", "rows"],
            [
                [
                    e(manifest["pipeline_file"]),
                    e(f"{c['name']} v{c['version']} ({c['hash']})"),
                    manifest["seed"],
                    e(manifest["created"]),
                    stats["rows"],
                ]
            ],
        ),
        "<p>stages: " + " &rarr; ".join(e(s.get("name", s["type"])) for s in manifest["config"]["stages"]) + "</p>",
        run_figures(manifest),
        samples,
    ]
    if "labels" in stats:
        labels, total = stats["labels"], sum(stats["labels"].values())
        parts += [
            "<h2>AI-feedback labels</h2>",
            html_table(
                ["label", "pairs", "share"],
                [[k, v, f"{100 * v / total:.1f}%" if total else "-"] for k, v in labels.items()],
            ),
            "<p>label method: " + e(", ".join(f"{k}: {v}" for k, v in sorted(stats["methods"].items()))) + "</p>",
            _img(plots, "labels"),
            "<h2>Per principle</h2>",
            "<p>A principle's vote is invalid when an order gave no usable choice; principles flagged "
            f"<b>mostly invalid</b> (over {100 * run_stats.MOSTLY_INVALID:.0f}% invalid) need a clearer question or another judge.</p>",
            html_table(
                ["principle", "votes", "invalid", "ties", "position consistency", "flag"],
                [
                    [
                        e(pid),
                        s["votes"],
                        s["invalid"],
                        s["ties"],
                        _pct(s["position_consistency"]),
                        "<b>mostly invalid</b>" if s["mostly_invalid"] else "",
                    ]
                    for pid, s in stats["principles"].items()
                ],
            ),
            _img(plots, "principles"),
            "<h2>Agreement between principles</h2>",
            f"<p>Two principles judging the same pair prefer the same answer: {_pct(stats['agreement']['overall'])}.</p>"
            if stats["agreement"]["principles"]
            else "<p>Each pair was judged under one principle (ensemble: 1): nothing to compare.</p>",
            _img(plots, "agreement"),
            _jury(stats["jury"]),
            "<h2>Length bias</h2>",
            f"<p>Among decided pairs of unequal length, the longer answer wins: {_pct(stats['length']['longer_wins'])} (50% is no bias).</p>",
            _img(plots, "length"),
            "<h2>Prompt injection</h2>",
        ]
        probe = stats["injection"]
        if probe is None:
            parts.append(
                "<p>Not measured: set <code>injection_probe</code> on the compare stage (a share of pairs, e.g. 0.1).</p>"
            )
        else:
            parts.append(
                f"<p>{probe['probed']} pairs were judged again with an instruction to choose the second answer planted inside it. "
                f"The label picks that answer {_pct(probe['follows'])} of the time, against {_pct(probe['baseline'])} without "
                f"the instruction; it flipped {_pct(probe['flipped'])} of the labels.</p>"
            )
    if stats["scores"]:
        scores = stats["scores"]
        parts += [
            "<h2>Direct scores</h2>",
            f"<p>{len(scores)} answers scored, mean {sum(scores) / len(scores):.2f}.</p>",
            _img(plots, "scores"),
        ]
    revisions = stats["revisions"]
    if revisions:
        flags = ", ".join(f"{k}: {v}" for k, v in revisions["flags"].items()) or "none"
        parts += [
            "<h2>Critique and revision</h2>",
            f"<p>{revisions['rows']} rows revised; flagged and left out of SFT: {e(flags)}.</p>",
            html_table(["principle", "critiques"], [[e(k), v] for k, v in sorted(revisions["principles"].items())]),
            _img(plots, "revisions"),
        ]
    if stats.get("revision_gain"):
        parts += _gain_section(manifest, stats["revision_gain"], plots)
    failures = stats["failures"]
    parts.append("<h2>Failures</h2>")
    if failures["recorded"]:
        parts += [
            f"<p>{failures['recorded']} failures recorded; {failures['rows_still_failed']} rows still failed "
            "(rerun the same <code>cai run</code> to retry them). Details: failures.jsonl.</p>",
            html_table(["reason", "count"], [[e(reason), n] for reason, n in failures["top_reasons"]]),
            _img(plots, "failures"),
        ]
    else:
        parts.append("<p>None.</p>")
    return html_page(f"cai report: {manifest['name']}", parts)


def html_page(title: str, parts: list[str]) -> str:
    """A whole HTML page of these parts (empty ones left out), with the report's style."""
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    return (
        f"<!doctype html>\n<html><head>{head}</head><body>\n" + "\n".join(p for p in parts if p) + "\n</body></html>\n"
    )


def _ratings_table(ratings: dict[str, Any]) -> str:
    """An eval's Elo ratings, a row per model and a column per axis (the eval's own report has the rest)."""
    axes = list(ratings["axes"])

    def cell(figures: dict[str, Any]) -> str:
        return (
            "-"
            if figures["elo"] is None
            else f"{figures['elo']:.0f} ({figures['ci95'][0]:.0f}-{figures['ci95'][1]:.0f})"
        )

    rows = [
        [html.escape(model), *(cell(ratings["axes"][axis]["models"][model]) for axis in axes)]
        for model in ratings["models"]
    ]
    return html_table(["model", *(f"{axis} Elo (95% CI)" for axis in axes)], rows)


def write_chain(workdir: Path) -> Path:
    """WORKDIR/report.html: the chain's steps in order, linking each run's report (rewritten here) and
    showing each training's curves and last logged metrics."""
    e = html.escape
    state = json.loads((workdir / CHAIN_STATE).read_text(encoding="utf-8"))
    parts = [f"<h1>cai chain: {e(workdir.name)}</h1>"]
    for name, step in state["steps"].items():
        folder = workdir / name
        parts.append(
            f"<h2>{e(name)}</h2><p><code>cai {e(' '.join(step['argv']))}</code> (finished {e(step['finished'])})</p>"
        )
        if (folder / EVAL_RATINGS).exists():  # an eval step: it wrote its report when it ran
            parts.append(f'<p><a href="{e(name)}/report.html">eval report</a></p>')
            parts.append(_ratings_table(json.loads((folder / EVAL_RATINGS).read_text(encoding="utf-8"))))
            parts += [
                f'<img src="{e(name)}/report/{e(png.name)}" alt="{e(png.stem)}">'
                for png in sorted((folder / "report").glob("*.png"))
            ]
        elif (folder / "manifest.json").exists():
            write(folder)
            parts.append(
                f'<p><a href="{e(name)}/report.html">run report</a> &middot; <a href="{e(name)}/datasets/">datasets</a></p>'
            )
        metrics = folder / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            last = json.loads(lines[-1]) if lines else {}
            cells = [[e(k), f"{v:.4g}" if isinstance(v, float) else e(str(v))] for k, v in last.items()]
            parts += [html_table(["last logged", "value"], cells)]
        if (folder / "curves.png").exists():
            parts.append(f'<img src="{e(name)}/curves.png" alt="{e(name)} curves">')
        if (folder / "rejection.jsonl").exists():
            rows = [json.loads(line) for line in (folder / "rejection.jsonl").read_text(encoding="utf-8").splitlines()]
            parts.append(
                html_table(
                    ["iteration", "mean reward", "mean best reward"],
                    [[r["iteration"], f"{r['mean_reward']:.4g}", f"{r['mean_best_reward']:.4g}"] for r in rows],
                )
            )
    evals = {name: folder for name in state["steps"] if ((folder := workdir / name) / EVAL_RATINGS).exists()}
    if len(evals) > 1:
        parts += _ratings_over_steps(workdir, evals)
    page = workdir / "report.html"
    write_atomic(page, html_page("cai chain", parts))
    return page


def _ratings_over_steps(workdir: Path, evals: dict[str, Path]) -> list[str]:
    """The chain's evals side by side (the rounds of an iterated chain): each model's Elo per eval, and
    with two axes each model's path over the evals on the frontier plane (WORKDIR/report/evals.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratings = {name: json.loads((folder / EVAL_RATINGS).read_text(encoding="utf-8")) for name, folder in evals.items()}
    axes = list(next(iter(ratings.values()))["axes"])
    rows = []
    for name, r in ratings.items():
        for model in r["models"]:
            cells = [
                r["axes"][axis]["models"].get(model, {}).get("elo") if axis in r["axes"] else None for axis in axes
            ]
            rows.append([html.escape(name), html.escape(model), *("-" if c is None else f"{c:.0f}" for c in cells)])
    parts = [
        "<h2>Ratings over the chain's evals</h2>",
        html_table(["eval", "model", *(f"{a} Elo" for a in axes)], rows),
    ]
    if len(axes) >= 2:
        x_axis, y_axis = ("helpful", "harmless") if {"helpful", "harmless"} <= set(axes) else (axes[1], axes[0])
        fig, ax = plt.subplots(figsize=(6, 5))
        models = list(dict.fromkeys(m for r in ratings.values() for m in r["models"]))
        for model in models:
            points = [
                (r["axes"][x_axis]["models"][model]["elo"], r["axes"][y_axis]["models"][model]["elo"], name)
                for name, r in ratings.items()
                if model in r["models"]
                and r["axes"][x_axis]["models"][model]["elo"] is not None
                and r["axes"][y_axis]["models"][model]["elo"] is not None
            ]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=model)
                for x, y, name in points:
                    ax.annotate(name.split("/")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{x_axis} Elo")
        ax.set_ylabel(f"{y_axis} Elo")
        ax.set_title("each model over the chain's evals")
        ax.legend(fontsize=8)
        fig.tight_layout()
        (workdir / "report").mkdir(exist_ok=True)
        fig.savefig(workdir / "report" / "evals.png", dpi=100)
        plt.close(fig)
        parts.append('<img src="report/evals.png" alt="ratings over the evals">')
    return parts


def write(run_dir: Path) -> Path:
    """RUN_DIR/report.html and RUN_DIR/report/*.png, replacing an older report whole."""
    if (run_dir / CHAIN_STATE).exists():
        return write_chain(run_dir)
    manifest, rows, failures = load_run(run_dir)
    stats = figures(manifest, rows, failures)
    with replaced_folder(run_dir / "report") as tmp:
        plots = embedded_plots(tmp, _plots(stats, tmp))
    page = run_dir / "report.html"
    write_atomic(page, render(manifest, stats, plots, report_samples.render(rows)))
    return page
