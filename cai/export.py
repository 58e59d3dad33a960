"""Rows -> datasets others read as they are, in TRL's conversational formats, each as a HF `datasets`
folder and as JSONL, plus every full row for tracing: SFT (`messages`) from critique-revision, and
preferences (`prompt`, `chosen`, `rejected`) from AI-feedback comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai import feedback
from cai.files import canonical_json
from cai.store import replaced_folder


def sft_record(row: dict[str, Any]) -> dict[str, Any]:
    final = row.get("revision", row.get("response"))
    return {
        "messages": [*row["messages"], {"role": "assistant", "content": final}],
        "id": row["id"],
        "prompt_id": row.get("source_id"),
        "principle_ids": row.get("principle_ids", []),
        "constitution_hash": row["constitution_hash"],
        "seed": row["seed"],
        "models": row.get("models", {}),
        "pipeline": row["pipeline"],
    }


def preference_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per labelled pair; ties and invalid labels stay in rows.jsonl only."""
    answers = row.get("responses") or [row["response"], row["revision"]]
    records = []
    for pair in row["pairs"]:
        if pair["label"] not in ("a", "b"):
            continue
        first, second = pair["answers"]
        chosen, rejected = (first, second) if pair["label"] == "a" else (second, first)
        p_chosen = pair["p_first"] if pair["label"] == "a" else 1 - pair["p_first"]
        records.append(
            {
                "prompt": row["messages"],
                "chosen": [{"role": "assistant", "content": answers[chosen]}],
                "rejected": [{"role": "assistant", "content": answers[rejected]}],
                "label_prob": p_chosen,
                "margin": feedback.margin(p_chosen),
                "principle_ids": pair["principle_ids"],
                "votes": [
                    {"principle_id": pid, "p_chosen": p if pair["label"] == "a" else 1 - p} for pid, p in pair["principle_probs"].items()
                ],
                "position_consistent": pair["position_consistent"],
                "label_method": pair["method"],  # logprobs (soft label) or parsed (a judge's stated choice)
                "group_id": row["group_id"],
                "id": f"{row['id']}-{first}-{second}",
                "constitution_hash": row["constitution_hash"],
                "seed": row["seed"],
                "models": row.get("models", {}),
                "pipeline": row["pipeline"],
            }
        )
    return records


def export(rows: list[dict[str, Any]], datasets_dir: Path) -> dict[str, int]:
    """Write datasets/rows.jsonl and, by what the rows hold, datasets/sft{,.jsonl} or
    datasets/preferences{,.jsonl}: all or nothing.

    Flagged rows (empty revision, revision that repeats the critique) stay out of SFT; tied and
    invalid comparisons stay out of preferences. Both are counted.
    """
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # cai draws its own progress; a second bar per save is noise
    compared = any("pairs" in r for r in rows)
    sets: dict[str, list[dict[str, Any]]] = {}
    counts = {"rows": len(rows)}
    if compared:
        sets["preferences"] = [rec for r in rows for rec in preference_records(r)]
        labels = [pair["label"] for r in rows for pair in r.get("pairs", [])]
        counts.update(preferences=len(sets["preferences"]), ties=labels.count("tie"), invalid=labels.count("invalid"))
    else:
        sets["sft"] = [sft_record(r) for r in rows if not r.get("flags")]
        counts.update(sft=len(sets["sft"]), flagged=len(rows) - len(sets["sft"]))
    with replaced_folder(datasets_dir) as tmp:
        (tmp / "rows.jsonl").write_text("".join(canonical_json(r) + "\n" for r in rows), encoding="utf-8")
        for name, records in sets.items():
            (tmp / f"{name}.jsonl").write_text("".join(canonical_json(r) + "\n" for r in records), encoding="utf-8")
            if records:
                Dataset.from_list(records).save_to_disk(str(tmp / name))
    return counts
