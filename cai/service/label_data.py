"""The pairs a labeling task asks people about, and what their labels become.

In: a run directory's compared pairs (datasets/rows.jsonl: each pair with the judge's votes, so the
judge can be measured against the people), an eval run's comparisons (two models' answers to one
prompt, with the judge's votes), or an HH-style JSONL file (`chosen`/`rejected` transcripts; its own
preference is not shown nor used: the people give theirs).
Out: HH-style `chosen`/`rejected` transcripts for `cai eval-judge`, `--calibrate` and `cai train
judge`; and preference records mixing people's and the judge's labels (`label_source`), in the
format `cai train rm` and `dpo` read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cai.core.disk import read_jsonl
from cai.core.errors import InputError
from cai.core.files import content_hash
from cai.generate import feedback, importers
from cai.generate.records import row_answers
from cai.generate.store import RunStore, ShardReader
from cai.judge.agreement import majority
from cai.rating import run as eval_run

Messages = list[dict[str, str]]

ROWS = Path("datasets") / "rows.jsonl"
JUDGE_KEYS = ("p_first", "label", "principle_probs", "votes", "method", "position_consistent")
HH_SPEAKERS = {"user": "Human", "assistant": "Assistant"}


def load_items(
    path: Path, shown: str, limit: int | None = None, eval_prompts: Callable[[str], dict[str, Messages]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The pairs of a run directory, an eval run directory or an HH-style JSONL file, as task items
    (`source_id`, `prompt` messages, `first` and `second` answers, the judge's pair or None), and what
    was left out: `identical` answers (nothing to choose) and pairs the judge labelled `invalid`.
    `eval_prompts(eval_file)`: an eval's prompts by id (the server loads the eval file, checked)."""
    left_out: Counter[str] = Counter()
    if path.is_dir() and (path / eval_run.JUDGMENTS).is_dir() and eval_prompts is not None:
        found = _eval_items(path, shown, eval_prompts, left_out)
    elif path.is_dir():
        rows = path / ROWS
        if not rows.is_file():
            raise InputError(
                shown,
                "source",
                f"no {ROWS.as_posix()} here: give a finished run with a compare stage, or an eval's run",
            )
        found = _run_items(read_jsonl(rows), left_out)
    elif path.is_file():
        try:
            pairs = importers.load_pairs(path)
        except InputError as exc:  # named as the request named it, not by the server's own path
            raise InputError(shown, exc.field, exc.message, exc.line) from None
        found = (
            {"source_id": f"line-{p['line']}", "prompt": p["context"], "first": p["chosen"], "second": p["rejected"]}
            for p in pairs
        )
    else:
        raise InputError(shown, "source", "not found: give a run directory or an HH-style JSONL file")
    items = []
    for item in found:
        if item["first"] == item["second"]:
            left_out["identical"] += 1
            continue
        items.append(item)
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise InputError(shown, "source", "no pairs to label here (a run needs a compare stage)")
    return items, dict(left_out)


def _run_items(rows: Iterable[dict[str, Any]], left_out: Counter[str]) -> Iterator[dict[str, Any]]:
    for row in rows:
        answers = row_answers(row) if "pairs" in row else []
        for pair in row.get("pairs", []):
            if pair.get("label") == "invalid":
                left_out["invalid"] += 1
                continue
            first, second = pair["answers"]
            yield {
                "source_id": f"{row['id']}-{first}-{second}",
                "prompt": row["messages"],
                "first": answers[first],
                "second": answers[second],
                # With a jury its votes are pooled: figures are the panel's, not each juror's.
                "judge": {k: pair[k] for k in JUDGE_KEYS if k in pair},
            }


def _eval_items(
    run_dir: Path, shown: str, eval_prompts: Callable[[str], dict[str, Messages]], left_out: Counter[str]
) -> Iterator[dict[str, Any]]:
    """An eval run's judgments (each two models' answers to a prompt of an axis), in the order judged."""
    store = RunStore(run_dir)
    manifest = store.read_manifest() or {}
    if manifest.get("kind") != "eval":
        raise InputError(shown, "source", "not an eval's run directory (its manifest.json names no eval)")
    prompts = eval_prompts(manifest["eval_file"])
    answers = store.stage_index(eval_run.ANSWERS)
    reader = ShardReader()
    try:
        for location in sorted(store.stage_index(eval_run.JUDGMENTS).values()):
            record = reader.read(location)
            if record.get("label") == "invalid":
                left_out["invalid"] += 1
                continue
            if record["prompt_id"] not in prompts or not all(a in answers for a in record["answers"]):
                left_out["not_found"] += 1  # the eval file changed since: its prompts are not these
                continue
            first, second = (reader.read(answers[a])["answer"] for a in record["answers"])
            yield {
                "source_id": f"{record['axis']}-{record['id']}",
                "prompt": prompts[record["prompt_id"]],
                "first": first,
                "second": second,
                "judge": {k: record[k] for k in JUDGE_KEYS if k in record},
            }
    finally:
        reader.close()


def transcript(prompt: list[dict[str, str]], answer: str) -> str:
    """HH-RLHF's `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript of a conversation and its final
    answer. A system message has no place in it and is left out."""
    turns = [f"\n\n{HH_SPEAKERS[m['role']]}: {m['content']}" for m in prompt if m["role"] in HH_SPEAKERS]
    return "".join(turns) + f"\n\nAssistant: {answer}"


def human_records(items: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """HH-style records, chosen by the people's majority label; pairs whose majority is a tie, or
    without a majority or a label, are left out and counted."""
    out, counts = [], Counter()
    for item in items:
        choice = majority(item["labels"])
        if choice not in ("a", "b"):
            counts[_why_out(item["labels"], choice)] += 1
            continue
        chosen, rejected = _ordered(item, choice)
        out.append({"chosen": transcript(item["prompt"], chosen), "rejected": transcript(item["prompt"], rejected)})
    counts["pairs"] = len(out)
    return out, dict(counts)


def mixed_records(items: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference records (TRL's conversational format): the people's majority label where they
    labelled the pair (it overrides the judge's, a human tie included), else the judge's. `label_prob`:
    for people, the share of their labels for the chosen answer (a tie counting half each way); for
    the judge, its P(chosen better). Ties and pairs with no label are left out and counted."""
    out, counts = [], Counter()
    for item in items:
        labels, judge = item["labels"], item.get("judge")
        if labels:
            choice = majority(labels)
            if choice not in ("a", "b"):
                counts[_why_out(labels, choice)] += 1
                continue
            votes = Counter(labels)
            p_chosen = (votes[choice] + votes["tie"] / 2) / len(labels)
            source = "human"
        elif judge is not None and judge.get("label") in ("a", "b"):
            choice, p_first = judge["label"], judge["p_first"]
            p_chosen = p_first if choice == "a" else 1 - p_first
            source = "ai"
        else:
            counts["judge_tie" if judge is not None else "unlabelled"] += 1
            continue
        chosen, rejected = _ordered(item, choice)
        out.append(
            {
                "prompt": item["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "label_prob": p_chosen,
                "margin": feedback.margin(p_chosen),
                "label_source": source,
                "human_labels": len(labels),
                "group_id": content_hash(item["prompt"]),
                "id": item["source_id"],
            }
        )
        counts[source] += 1
    return out, dict(counts)


def _ordered(item: dict[str, Any], choice: str) -> tuple[str, str]:
    return (item["first"], item["second"]) if choice == "a" else (item["second"], item["first"])


def _why_out(labels: list[str], choice: str | None) -> str:
    if not labels:
        return "unlabelled"
    return "ties" if choice == "tie" else "no_majority"
