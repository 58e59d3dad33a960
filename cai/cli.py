"""The `cai` command. Bad input: exit 2 with one line `FILE: field: what is wrong`; failed rows: exit 1."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from cai.core import logs
from cai.core.errors import InputError
from cai.generate.backends.base import BackendCallError, BackendStartError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130  # FAILED: rows failed, or an engine did not start


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from cai import chain
    from cai.generate import config, pipeline
    from cai.generate.keys import used_backends
    from cai.judge import report

    if chain.is_chain(args.pipeline):
        if args.shard:
            raise InputError(
                args.pipeline, None, "--shard splits a pipeline's rows: run a chain's pipelines one by one"
            )
        return chain.run(
            chain.load(args.pipeline, args.set, workdir=args.run_dir, limit=args.limit),
            main,
            quiet=args.quiet,
            verbose=args.verbose,
        )
    cfg = config.load(args.pipeline, args.set)
    _say_where_keys_go(used_backends(cfg), "run")
    summary = pipeline.run(
        cfg,
        run_dir=args.run_dir,
        limit=args.limit,
        show_progress=not args.quiet,
        engine_log=not args.verbose,
        shard=args.shard,
    )
    _print_summary(summary)
    page = summary.run_dir / "report.html"
    print(f"report: {report.write(summary.run_dir) if summary.exported_now or not page.exists() else page}")
    return EXIT_OK if summary.ok else EXIT_FAILED


def _shard(text: str):
    from cai.generate.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_merge(args: argparse.Namespace) -> int:
    from cai.generate.shards import merge
    from cai.judge import report

    summary = merge(args.run_dirs, args.output)
    exported = ", ".join(f"{k}: {v}" for k, v in summary.exported.items())
    print(f"merged {summary.shards} shards into {summary.run_dir} ({exported}; rows failed: {summary.failed})")
    print(f"report: {report.write(summary.run_dir)}")
    return EXIT_OK if not summary.failed else EXIT_FAILED


def _say_where_keys_go(specs, command: str) -> None:
    """Before any backend starts: a file from elsewhere cannot send a key off this machine unseen."""
    from cai.generate.keys import key_destinations

    for line in key_destinations(specs):
        print(f"cai {command}: {line}", file=sys.stderr, flush=True)


def _print_summary(summary) -> None:
    failed = len(summary.failed_ids)
    done = summary.stages[-1].done if summary.stages else 0
    print(f"run: {summary.run_dir}")
    for s in summary.stages:
        print(
            f"  {s.name:<18} {s.done}/{summary.input_rows} rows ({s.new} new, {s.failed} failed), {s.tokens} tokens, {s.seconds:.1f} s"
        )
    print(
        f"rows done: {done}/{summary.input_rows}, rows failed: {failed}, tokens generated: {summary.tokens} "
        f"(prompt tokens: {summary.prompt_tokens}), calls replayed from cache: {summary.cached_calls}, time: {summary.seconds:.1f} s"
    )
    for backend, endpoints in summary.endpoints.items():
        for e in endpoints:
            latency = (
                ""
                if e["latency_p50_s"] is None
                else f", latency p50/p90/p99 {e['latency_p50_s']:.3f}/{e['latency_p90_s']:.3f}/{e['latency_p99_s']:.3f} s"
            )
            aside = f", set aside {e['set_aside']}x" if e["set_aside"] else ""
            print(f"  {backend} {e['url']}: {e['requests']} requests, {e['errors']} errors{aside}{latency}")
    exported = summary.exported
    if "preferences" in exported:
        detail = f"preferences: {exported['preferences']} pairs, left out: {exported['ties']} ties, {exported['invalid']} invalid"
    elif "unpaired" in exported:
        detail = (
            f"unpaired: {exported['unpaired']} answers, {exported['desirable']} desirable, "
            f"left out: {exported['unscored']} unscored"
        )
    else:
        detail = f"sft: {exported.get('sft', 0)} rows, flagged and left out: {exported.get('flagged', 0)}"
    kept = "" if summary.exported_now else "; unchanged since the last run, kept"
    print(f"datasets: {summary.run_dir / 'datasets'} ({detail}; all rows: rows.jsonl{kept})")
    if failed:
        print(f"failures: {summary.run_dir / 'failures.jsonl'} (rerun the same command to retry them)")


def cmd_eval(args: argparse.Namespace) -> int:
    from cai.rating import config, run

    cfg = config.load(args.eval, args.set)
    _say_where_keys_go(cfg.used_backends(), "eval")
    summary = run.run(
        cfg, run_dir=args.run_dir, limit=args.limit, show_progress=not args.quiet, engine_log=not args.verbose
    )
    print(f"eval: {summary.run_dir}")
    for work in (summary.answers, summary.judgments):
        print(f"  {work.name:<10} {work.done}/{work.total} ({work.new} new, {work.failed} failed), {work.calls} calls")
    print(
        f"tokens generated: {summary.tokens}, calls replayed from cache: {summary.cached_calls}, time: {summary.seconds:.1f} s"
    )
    ratings = summary.ratings
    for axis, figures in ratings["axes"].items():
        consistency = _figure(figures["position_consistency"])
        print(
            f"{axis}: {figures['n_comparisons']} comparisons on {figures['n_prompts']} prompts, position consistency {consistency}"
        )
        for name, f in sorted(figures["models"].items(), key=lambda item: -(item[1]["elo"] or 0)):
            elo = "-" if f["elo"] is None else f"{f['elo']:.0f} ({f['ci95'][0]:.0f}-{f['ci95'][1]:.0f})"
            print(
                f"  {name:<20} Elo {elo:<18} win rate {_figure(f['win_rate_vs_baseline'])} "
                f"(length-controlled {_figure(f['lc_win_rate_vs_baseline'])}), refusals {_figure(f['refusal_rate'])}"
            )
    print(f"ratings: {summary.run_dir / 'ratings.json'}, report: {summary.run_dir / 'report.html'}")
    if not summary.ok:
        print(f"failures: {summary.run_dir / 'failures.jsonl'} (rerun the same command to retry them)")
    return EXIT_OK if summary.ok else EXIT_FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    from cai.core.files import load_yaml
    from cai.generate import config, constitution, prompts

    pipeline_keys = _pipeline_only_keys()

    path = Path(args.file)
    if path.suffix == ".jsonl":
        n = len(prompts.load(path))
        print(f"{path}: ok (prompt set, {n} prompts)")
        return EXIT_OK
    doc = load_yaml(path)
    if isinstance(doc, dict) and "axes" in doc:
        from cai.rating import config as eval_config

        e = eval_config.load(path)
        print(f"{path}: ok (eval {e.name!r}: models {', '.join(e.models)}; axes {', '.join(e.axes)})")
    elif isinstance(doc, dict) and "steps" in doc:
        from cai import chain

        c = chain.load(path)
        print(f"{path}: ok (chain {c.name!r}: {', '.join(s.name for s in c.steps)}; writes to {c.workdir})")
    elif isinstance(doc, dict) and set(doc) & pipeline_keys:
        cfg = config.load(path)
        n = sum(1 for _ in cfg.prompts())  # reads and validates every prompt the pipeline names
        print(
            f"{path}: ok (pipeline {cfg.name!r}: {len(cfg.stages)} stages, {n} prompts, constitution {cfg.constitution.name!r})"
        )
    else:
        c = constitution.from_dict(doc, str(path))
        print(f"{path}: ok (constitution {c.name!r} v{c.version}, {len(c.principles)} principles, hash {c.hash})")
    return EXIT_OK


def _pipeline_only_keys() -> set[str]:
    from cai.core.files import schema

    return set(schema("pipeline")["properties"]) - set(schema("constitution")["properties"])


def cmd_import(args: argparse.Namespace) -> int:
    from cai.generate.importers import IMPORTERS

    constitution = IMPORTERS[args.format](args.source)
    out = Path(args.output)
    constitution.save(out)
    print(
        f"{out}: {len(constitution.principles)} principles, {len(constitution.few_shot)} few-shot dialogues, "
        f"{len(constitution.comparison_few_shot)} comparison few-shots"
    )
    return EXIT_OK


def cmd_eval_judge(args: argparse.Namespace) -> int:
    import json

    from cai.core.disk import write_atomic
    from cai.core.models import cai_home
    from cai.generate import config, importers
    from cai.generate.keys import used_backends
    from cai.judge import eval_judge

    cfg = config.load(args.pipeline, args.set)
    _say_where_keys_go(used_backends(cfg), "eval-judge")
    pairs = importers.load_pairs(args.pairs, args.limit, args.skip)
    log = args.log or cai_home() / "logs" / "eval-judge.log"
    fresh = not log.exists()
    try:
        with contextlib.nullcontext() if args.verbose else logs.redirected(log):
            report = eval_judge.evaluate(
                cfg, pairs, compare_cot=args.compare_cot, injection=args.injection, calibrate=bool(args.calibrate)
            )
    except BackendStartError as exc:  # what the engine said is in the log, not on the terminal
        raise BackendStartError(f"{exc} (its output: {log})") from exc
    except InputError:
        if fresh and log.exists() and not log.stat().st_size:  # bad input writes nothing, not even an empty log
            log.unlink()
            with contextlib.suppress(OSError):
                log.parent.rmdir()
        raise
    if args.calibrate:
        eval_judge.write_calibration(report, Path(args.calibrate), cfg, args.pairs)
    for variant in report.get("by_chain_of_thought", {"": report}).values():
        judge = variant["judge"]
        print(
            f"judge {judge['model']} (chain of thought {'on' if judge['chain_of_thought'] else 'off'}) on {variant['n']} pairs "
            f"({variant['invalid']} invalid, {variant['identical_answers']} with identical answers)"
        )
        keys = ["accuracy", "accuracy_first_order", "accuracy_swapped_order", "position_consistency"]
        if "injection_n" in variant:
            keys += ["injection_follow_rate", "injection_baseline_rate"]
        for key in keys + ["length_win_rate", "human_length_win_rate"]:
            low, high = variant[f"{key}_ci95"]
            print(f"  {key:<24} {variant[key]:.3f}  (95% CI {low:.3f}-{high:.3f})")
            if key == "accuracy":
                print(_length_split_line(variant))
        for key in ("length_win_rate_balanced", "ece"):
            print(f"  {key:<24} {_figure(variant[key])}")
        for role, figures in variant.get("jurors", {}).items():
            print(
                f"  juror {role} ({judge['jury'][role]['model']}, weight {judge['jury'][role]['weight']}): accuracy {figures['accuracy']:.3f}, "
                f"position consistency {figures['position_consistency']:.3f} on {figures['n']} pairs"
            )
        if "juror_agreement" in variant:
            agreement, kappa = variant["juror_agreement"], variant["juror_agreement"]["fleiss_kappa"]
            share = "-" if agreement["percent_agreement"] is None else f"{agreement['percent_agreement']:.3f}"
            print(
                f"  jurors agree on {share} of {agreement['n']} pairs (Fleiss' kappa {'-' if kappa is None else f'{kappa:.3f}'})"
            )
    if args.calibrate:
        c = report["calibration"]
        print(
            f"calibration: temperature {c['temperature']:.3f}, position offset {c['position_offset']:.3f} ({c['votes']} votes) -> {args.calibrate}\n"
            f"  ece {_figure(c['ece_before'])} -> {_figure(c['ece_after'])}, nll per vote {_figure(c['nll_before'])} -> {_figure(c['nll_after'])} "
            f"(after: {c['folds']}-fold cross-fitted); reliability diagram: {c['reliability_png']}"
        )
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
    return EXIT_OK


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_report(args: argparse.Namespace) -> int:
    from cai.core.disk import read_json_or_none
    from cai.judge import report
    from cai.rating import report as eval_report

    manifest = read_json_or_none(args.run_dir / "manifest.json") or {}
    print((eval_report if manifest.get("kind") == "eval" else report).write(args.run_dir))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from cai.generate.export import convert

    print(convert(args.run_dir, args.format, args.output))
    return EXIT_OK


PREPARE_LOG = "prepare.log"  # in $CAI_HOME/models: transformers' output while a model is converted


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from cai.core.models import ModelError, models_dir, prepare

    try:
        with logs.redirected(models_dir() / PREPARE_LOG):
            path = prepare(args.name)
    except ModelError as exc:
        print(f"cai models prepare: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    return EXIT_OK


TRAIN_LOG = "train.log"  # in OUTPUT: the libraries' output during a training


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from cai.train import config as train_config
    from cai.train.data import TemplateError
    from cai.train.reward import JudgeError
    from cai.train.runtime import NonFiniteError

    trainer = importlib.import_module(train_config.RECIPES[args.kind])
    cfg = train_config.load(args.kind, args.config, args.set)
    fresh = not cfg.output_dir.exists()
    log = cfg.output_dir / TRAIN_LOG
    try:
        with contextlib.nullcontext() if args.verbose else logs.redirected(log):
            final = trainer.train(cfg)
    except TemplateError as exc:
        raise InputError(cfg.model, "chat_template", str(exc)) from None
    except (NonFiniteError, JudgeError) as exc:
        print(f"cai train {args.kind}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except InputError:
        if fresh and log.exists() and [p.name for p in cfg.output_dir.iterdir()] == [TRAIN_LOG]:
            shutil.rmtree(cfg.output_dir)  # bad input writes nothing: not even the log of a run that never started
        raise
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun the first process says where things are
        return EXIT_OK
    print(f"model: {final}")
    if args.kind == "rejection":
        print(
            f"per iteration: {cfg.output_dir / 'rejection.jsonl'}, winners and fine-tuning in {cfg.output_dir}/iteration-N"
        )
    elif args.kind == "rest":
        print(
            f"per Grow and threshold: {cfg.output_dir / 'rest.jsonl'}, samples and fine-tuning in {cfg.output_dir}/grow-N"
        )
    elif args.kind == "hir":
        print(
            f"per iteration: {cfg.output_dir / 'hir.jsonl'}, relabeled samples and training in {cfg.output_dir}/iteration-N; "
            f"prompt the model with {final / 'hir.json'}'s instruction"
        )
    elif args.kind == "judge":
        print(
            f"held-out accuracy and position consistency before and after: {final / 'judge.json'}; name {final} as a pipeline's judge model"
        )
    elif args.kind == "distill":
        print(
            f"teacher answers: {cfg.output_dir / 'teacher'}, held-out KL to the teacher before and after: {cfg.output_dir / 'distill.json'}"
        )
    else:
        print(f"metrics: {cfg.output_dir / 'metrics.jsonl'}, curves: {cfg.output_dir / 'curves.png'}")
    return EXIT_OK


def _length_split_line(figures: dict) -> str:
    """The length-balanced accuracy and the two accuracies it averages, for the line under accuracy."""
    sides = ", ".join(
        f"{figures[f'accuracy_chosen_{side}']:.3f} on {figures[f'chosen_{side}_n']} chosen-{side}"
        for side in ("longer", "shorter")
    )
    return f"  {'length-balanced':<24} {_figure(figures['length_balanced_accuracy'])}  ({sides})"


def cmd_eval_rm(args: argparse.Namespace) -> int:
    import json

    from cai.core.disk import write_atomic
    from cai.train import data, reward

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise InputError(str(model), None, "not a model folder (no config.json)")
    if not any(
        a.endswith("ForSequenceClassification")
        for a in json.loads((model / "config.json").read_text()).get("architectures") or []
    ):
        raise InputError(
            str(model), None, "not a reward model (no sequence-classification head): train one with `cai train rm`"
        )
    pairs = data.load_preferences(Path(args.pairs), args.limit)
    report = reward.evaluate_pairs(reward.RewardScorer({"rm": (model, 1.0)}), pairs)
    low, high = report["accuracy_ci95"]
    print(f"reward model {model} on {report['n']} pairs")
    print(f"  accuracy     {report['accuracy']:.3f}  (95% CI {low:.3f}-{high:.3f})")
    print(_length_split_line(report))
    print(f"  mean margin  {report['mean_margin']:.3f}")
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from cai.service.server import ServeOptions, UnsafeServe, serve

    try:
        serve(ServeOptions(args.workspace, args.host, args.port, args.max_jobs, args.max_queued, args.backends))
    except UnsafeServe as exc:
        print(f"cai serve: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from cai.service.client import ServerError, call, job_line

    kind = "eval" if args.eval else "pipeline"
    body = {kind: args.pipeline, "set": args.set, "limit": args.limit}
    try:
        job = call(args.server, "POST", "/api/jobs/eval" if args.eval else "/api/jobs/run", body)
    except ServerError as exc:
        print(f"cai submit: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.status in (400, 422) else EXIT_FAILED
    print(job_line(job))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from cai.service.client import ServerError, call, job_line

    try:
        jobs = call(args.server, "GET", "/api/jobs")
    except ServerError as exc:
        print(f"cai jobs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for job in jobs:
        print(job_line(job))
    return EXIT_OK


def _run_options(p: argparse.ArgumentParser, limit: str) -> None:
    """What `cai run` and `cai eval` both take: a run directory, a limit, overrides, and how loud to be."""
    p.add_argument("--run-dir", type=Path, help="run directory (default: the file's output.dir, else runs/NAME)")
    p.add_argument("--limit", type=_positive_int, help=f"use only {limit}")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of the file")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="engine and library output on the terminal (by default: RUN_DIR/engine.log)",
    )


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes follow the same rule as bad files: one line on stderr, exit 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from cai.core.models import EMBEDDED
    from cai.generate.export import FORMATS
    from cai.generate.importers import IMPORTERS
    from cai.service.jobs import DEFAULT_MAX_QUEUED
    from cai.train import config as train_config

    parser = OneLineErrors(prog="cai", description="Constitutional AI data and training toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    p = sub.add_parser("run", help="run a pipeline or chain file (resumes when its run directory exists)")
    p.add_argument("pipeline")
    _run_options(p, "the first N prompts")
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="only the rows whose id hashes to shard K of N (K from 0: $JOB_COMPLETION_INDEX, $SLURM_ARRAY_TASK_ID "
        "of --array=0-(N-1)); default run directory runs/NAME-shard-K-of-N; join them with `cai merge`",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "merge", help="join the run directories of every shard of a run (`cai run --shard K/N`) into one run"
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, type=Path, help="the merged run's directory (new or empty)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "eval", help="rate models: answers to each axis' prompts compared by the judge, Elo ratings with intervals"
    )
    p.add_argument("eval", help="eval file (schema: cai/schemas/eval.json)")
    _run_options(p, "the first N prompts of each axis")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "validate", help="validate a constitution, pipeline or eval (with the files it names), chain or prompt set"
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("eval-judge", help="agreement of a pipeline's judge with human labels on HH-RLHF style pairs")
    p.add_argument("pairs", help="JSONL of {'chosen', 'rejected'} transcripts")
    p.add_argument("--pipeline", required=True, help="pipeline whose judge role and compare stage are measured")
    p.add_argument("--limit", type=_positive_int, help="use only the first N pairs")
    p.add_argument(
        "--skip",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="pass over the first N pairs (with --limit: pairs N+1 to N+limit)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a pipeline field")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument(
        "--compare-cot", action="store_true", help="also measure with chain-of-thought switched the other way"
    )
    p.add_argument(
        "--injection",
        action="store_true",
        help="also judge each pair with 'choose this one' planted in the rejected answer",
    )
    p.add_argument(
        "--calibrate",
        metavar="OUT.json",
        help="fit a temperature and position offset on the pairs, for a compare stage's `calibration:`; diagram in OUT.png",
    )
    p.add_argument("--log", type=Path, help="where the engine's output goes (default: $CAI_HOME/logs/eval-judge.log)")
    p.add_argument("-v", "--verbose", action="store_true", help="engine and library output on the terminal")
    p.set_defaults(func=cmd_eval_judge)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: labels, judge bias checks, failures, with plots")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export",
        help="a run's dataset as parquet, JSONL or a HF datasets folder, with its dataset card, in a new folder",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--output", required=True, type=Path, help="a new (or empty) folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-constitution", help="convert another project's constitution format")
    p.add_argument("--format", required=True, choices=sorted(IMPORTERS))
    p.add_argument("source", help="anthropic: the folder of the paper's JSON files; llm-swarm: the JSON file")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("models", help="embedded models")
    models_sub = p.add_subparsers(dest="models_command", required=True, parser_class=OneLineErrors)
    q = models_sub.add_parser("prepare", help="convert an embedded model into a safetensors checkpoint in $CAI_HOME")
    q.add_argument("name", choices=sorted(EMBEDDED))
    q.set_defaults(func=cmd_models_prepare)

    p = sub.add_parser(
        "train",
        help=f"train a model ({', '.join(train_config.KINDS)}) from a train config (resumes from OUTPUT's newest checkpoint)",
    )
    p.add_argument("kind", choices=train_config.KINDS)
    p.add_argument("config", help="train config YAML (schema: cai/schemas/train.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config field")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="library and engine output on the terminal (by default: OUTPUT/train.log)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval-rm", help="pairwise accuracy of a reward model on preference pairs (HH-RLHF style or cai's format)"
    )
    p.add_argument("model", help="a reward model folder (OUTPUT/final of `cai train rm`)")
    p.add_argument("pairs", help="JSONL of {'chosen', 'rejected'} transcripts, or a cai preferences dataset")
    p.add_argument("--limit", type=_positive_int, help="use only the first N pairs")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval_rm)

    p = sub.add_parser(
        "serve",
        help="job server with a web dashboard over a workspace folder (tokens: $CAI_SERVER_TOKEN, read-only $CAI_SERVER_READ_TOKEN, labelers' $CAI_SERVER_LABEL_TOKENS as NAME=TOKEN,...)",
    )
    p.add_argument("--workspace", required=True, type=Path, help="folder of constitutions, prompts, pipelines and runs")
    p.add_argument("--host", default="127.0.0.1", help="off loopback, $CAI_SERVER_TOKEN must be set")
    p.add_argument("--port", type=int, default=8420)
    p.add_argument("--max-jobs", type=_positive_int, default=1, help="jobs that run at once")
    p.add_argument(
        "--max-queued",
        type=_positive_int,
        default=DEFAULT_MAX_QUEUED,
        help="jobs that may wait; more submissions get 429",
    )
    p.add_argument(
        "--backends",
        type=Path,
        help="YAML file of the API backends jobs may use, with their keys (schema: cai/schemas/server_backends.json)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "submit", help="queue a run of a pipeline (or an eval) on a `cai serve` server (token: $CAI_SERVER_TOKEN)"
    )
    p.add_argument("pipeline", help="pipeline file (with --eval: eval file), relative to the server's workspace")
    p.add_argument("--eval", action="store_true", help="the file is an eval file: queue `cai eval` on it")
    p.add_argument("--server", required=True, help="the server's URL, e.g. http://127.0.0.1:8420")
    p.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a pipeline field")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "jobs", help="list the jobs of a `cai serve` server (token: $CAI_SERVER_TOKEN or $CAI_SERVER_READ_TOKEN)"
    )
    p.add_argument("--server", required=True, help="the server's URL, e.g. http://127.0.0.1:8420")
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    # vLLM logs every engine step at INFO; cai reports progress itself. A user's own setting wins.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BackendStartError, BackendCallError) as exc:
        print(f"cai {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
