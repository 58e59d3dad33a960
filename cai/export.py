"""Rows -> datasets others read as they are, in TRL's conversational formats, each as a HF `datasets`
folder and as JSONL, plus every full row for tracing: SFT (`messages`) from critique-revision, and
preferences (`prompt`, `chosen`, `rejected`) from AI-feedback comparisons."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai import feedback
from cai.files import canonical_json
from cai.store import read_jsonl, replaced_folder


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


def export(rows: Iterable[dict[str, Any]], datasets_dir: Path) -> dict[str, int]:
    """Write datasets/rows.jsonl and, by what the rows hold, datasets/sft{,.jsonl} or
    datasets/preferences{,.jsonl}: all or nothing, streaming (rows are read once, one at a time).

    Flagged rows (empty revision, revision that repeats the critique) stay out of SFT; tied and
    invalid comparisons stay out of preferences. Both are counted.
    """
    counts: Counter[str] = Counter()
    with replaced_folder(datasets_dir) as tmp:
        rows_file = open(tmp / "rows.jsonl", "w", encoding="utf-8")
        name = None
        for row in rows:
            if name is None:  # every row of a run has the same shape: the first says which dataset this is
                name = "preferences" if "pairs" in row else "sft"
                records_file = open(tmp / f"{name}.jsonl", "w", encoding="utf-8")
            counts["rows"] += 1
            rows_file.write(canonical_json(row) + "\n")
            if name == "preferences":
                labels = [pair["label"] for pair in row["pairs"]]
                counts.update(ties=labels.count("tie"), invalid=labels.count("invalid"))
                records = preference_records(row)
            else:
                records = [] if row.get("flags") else [sft_record(row)]
                counts["flagged"] += not records
            counts[name] += len(records)
            records_file.writelines(canonical_json(r) + "\n" for r in records)
        rows_file.close()
        if name is None:
            name = "sft"
            (tmp / "sft.jsonl").touch()
        else:
            records_file.close()
        if counts[name]:
            _save_dataset(tmp / f"{name}.jsonl", tmp / name, tmp / ".cache")
    keys = ("rows", "preferences", "ties", "invalid") if name == "preferences" else ("rows", "sft", "flagged")
    return {key: counts[key] for key in keys}


def _save_dataset(jsonl: Path, folder: Path, cache_dir: Path) -> None:
    """A HF `datasets` folder (load_from_disk) from a JSONL file, in chunks: memory does not grow with it.
    The schema is unified over every chunk first, so a column that starts out null (say
    position_consistent without swaps) and holds values later gets the values' type."""
    import pyarrow as pa
    from datasets import Dataset, Features
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # cai draws its own progress; a second bar per save is noise
    schema = pa.unify_schemas([pa.Table.from_pylist(chunk).schema for chunk in _chunks(jsonl)], promote_options="permissive")
    dataset = Dataset.from_generator(_records, gen_kwargs={"path": str(jsonl)}, features=Features.from_arrow_schema(schema), cache_dir=str(cache_dir))
    dataset.save_to_disk(str(folder))
    del dataset
    shutil.rmtree(cache_dir, ignore_errors=True)


def _records(path: str) -> Iterator[dict[str, Any]]:
    yield from read_jsonl(Path(path))


def _chunks(path: Path, size: int = 1000) -> Iterator[list[dict[str, Any]]]:
    records = read_jsonl(path)
    while chunk := list(itertools.islice(records, size)):
        yield chunk
