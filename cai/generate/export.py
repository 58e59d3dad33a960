"""Rows -> datasets others read as they are, in TRL's conversational formats, each as a HF `datasets`
folder and as JSONL, plus every full row for tracing: SFT (`messages`) from critique-revision,
preferences (`prompt`, `chosen`, `rejected`) from AI-feedback comparisons, and unpaired answers
(`prompt`, `completion`, `label`) from direct scores."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.core.disk import read_jsonl, replaced_folder
from cai.core.errors import InputError
from cai.core.files import canonical_json
from cai.generate import dataset_card, feedback
from cai.generate.records import Row, final_answer, row_answers, row_samples


def sft_record(row: Row) -> dict[str, Any]:
    return {
        "messages": [*row["messages"], {"role": "assistant", "content": final_answer(row)}],
        "id": row["id"],
        "prompt_id": row.get("source_id"),
        "principle_ids": row.get("principle_ids", []),
        "constitution_hash": row["constitution_hash"],
        "seed": row["seed"],
        "models": row.get("models", {}),
        "pipeline": row["pipeline"],
    }


def preference_records(row: Row) -> list[dict[str, Any]]:
    """One record per labelled pair; ties and invalid labels stay in rows.jsonl only."""
    answers = row_answers(row)
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
                    {"principle_id": pid, "p_chosen": p if pair["label"] == "a" else 1 - p}
                    for pid, p in pair["principle_probs"].items()
                ],
                "position_consistent": pair["position_consistent"],
                "label_method": pair["method"],  # logprobs (soft label) or parsed (a judge's stated choice)
                "group_id": row["group_id"],
                "id": f"{row['id']}-{first}-{second}",
                "constitution_hash": row["constitution_hash"],
                "seed": row["seed"],
                "models": row.get("models", {}),
                "pipeline": row["pipeline"],
                **_judging_marks(pair),
            }
        )
    return records


# A juror's label as the exported pair reads it: the pair's first answer is `chosen` when it is labelled a.
_SIDES = {"a": {"a": "chosen", "b": "rejected"}, "b": {"a": "rejected", "b": "chosen"}}


def _judging_marks(pair: dict[str, Any]) -> dict[str, Any]:
    """With a jury, each juror's own label (`jurors`); with a calibration, its file's hash: columns only
    runs that have them get, so every record of a run has the same ones."""
    marks: dict[str, Any] = {}
    if "jurors" in pair:
        side = _SIDES[pair["label"]]
        marks["jurors"] = [
            {
                "role": role,
                "model": juror["model"],
                "weight": juror["weight"],
                "label": side.get(juror["label"], juror["label"]),  # chosen, rejected, tie or invalid
                "p_chosen": _toward_chosen(juror["p_first"], pair["label"]),
                "position_consistent": juror["position_consistent"],
                "method": juror["method"],
            }
            for role, juror in pair["jurors"].items()
        ]
    if "calibration" in pair:
        marks["calibration"] = pair["calibration"]
    return marks


def _toward_chosen(p_first: float | None, label: str) -> float | None:
    """P(the pair's first answer is better) as P(`chosen` is better); None (no usable choice) stays."""
    if p_first is None:
        return None
    return p_first if label == "a" else 1 - p_first


# what an export of each dataset counts: its records, and what it left out
SUMMARY = {
    "sft": ("rows", "sft", "flagged"),
    "preferences": ("rows", "preferences", "ties", "invalid"),
    "unpaired": ("rows", "unpaired", "desirable", "unscored"),
}


def unpaired_records(row: Row) -> list[dict[str, Any]]:
    """One record per scored answer in TRL's unpaired format (`prompt`, `completion`, `label`): KTO trains
    on them without pairs. `label` is the score stage's verdict (score above its `desirable_above`);
    answers no principle scored stay in rows.jsonl only."""
    return [
        {
            "prompt": row["messages"],
            "completion": [{"role": "assistant", "content": answer}],
            "label": scored["desirable"],
            "score": scored["score"],
            "principle_scores": scored["principle_scores"],
            "group_id": row["id"],  # the answers to one prompt: KTO's KL estimate pairs prompts with others' answers
            "id": f"{row['id']}-{index}",
            "constitution_hash": row["constitution_hash"],
            "seed": row["seed"],
            "models": row.get("models", {}),
            "pipeline": row["pipeline"],
        }
        for index, (answer, scored) in enumerate(zip(row_samples(row), row["scores"]))
        if scored["score"] is not None
    ]


def export(
    rows: Iterable[Row], datasets_dir: Path, provenance: dataset_card.Provenance | None = None
) -> dict[str, int]:
    """Write datasets/rows.jsonl and, by what the rows hold, datasets/sft{,.jsonl},
    datasets/preferences{,.jsonl} or datasets/unpaired{,.jsonl}, and with `provenance` the dataset card
    datasets/README.md: all or nothing, streaming (rows are read once, one at a time).

    Flagged rows (empty revision, revision that repeats the critique) stay out of SFT; tied and
    invalid comparisons stay out of preferences; unscored answers stay out of the unpaired set. Each is
    counted (SUMMARY).
    """
    counts: Counter[str] = Counter()
    columns: dict[str, None] = {}  # every record's keys, in first-seen order
    with replaced_folder(datasets_dir) as tmp:
        rows_file = open(tmp / "rows.jsonl", "w", encoding="utf-8")
        name = None
        for row in rows:
            if name is None:  # every row of a run has the same shape: the first says which dataset this is
                name = "preferences" if "pairs" in row else "unpaired" if "scores" in row else "sft"
                records_file = open(tmp / f"{name}.jsonl", "w", encoding="utf-8")
            counts["rows"] += 1
            rows_file.write(canonical_json(row) + "\n")
            if name == "preferences":
                labels = [pair["label"] for pair in row["pairs"]]
                counts.update(ties=labels.count("tie"), invalid=labels.count("invalid"))
                records = preference_records(row)
            elif name == "unpaired":
                records = unpaired_records(row)
                counts.update(desirable=sum(r["label"] for r in records), unscored=len(row["scores"]) - len(records))
            else:
                records = [] if row.get("flags") else [sft_record(row)]
                counts["flagged"] += not records
            counts[name] += len(records)
            for record in records:
                columns.update(dict.fromkeys(record))
            records_file.writelines(canonical_json(r) + "\n" for r in records)
        rows_file.close()
        if name is None:
            name = "sft"
            (tmp / "sft.jsonl").touch()
        else:
            records_file.close()
        if counts[name]:
            _save_dataset(tmp / f"{name}.jsonl", tmp / name, tmp / ".cache")
        summary = {key: counts[key] for key in SUMMARY[name]}
        if provenance is not None:
            (tmp / "README.md").write_text(
                dataset_card.render(name, provenance, summary, list(columns)), encoding="utf-8"
            )
    return summary


FORMATS = ("jsonl", "parquet", "hf")


def convert(run_dir: Path, fmt: str, dest: Path) -> Path:
    """`cai export`: a run's exported records as `fmt` in the new folder `dest`, with their dataset card;
    all or nothing. Returns the records' path."""
    if fmt not in FORMATS:
        raise InputError(str(dest), None, f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    datasets_dir = run_dir / "datasets"
    kind = next((k for k in SUMMARY if (datasets_dir / f"{k}.jsonl").is_file()), None)
    if kind is None:
        raise InputError(
            str(run_dir),
            None,
            "no exported datasets here (datasets/sft.jsonl, preferences.jsonl or unpaired.jsonl): run its pipeline first",
        )
    if dest.exists() and any(dest.iterdir()):
        raise InputError(str(dest), None, "exists and is not empty: name a new folder")
    records = datasets_dir / f"{kind}.jsonl"
    if records.stat().st_size == 0:
        raise InputError(str(records), None, f"holds no {kind} records: nothing to export")
    with replaced_folder(dest) as tmp:
        if fmt == "jsonl":
            shutil.copyfile(records, out := tmp / records.name)
        elif fmt == "parquet":
            _write_parquet(records, out := tmp / f"{kind}.parquet")
        else:  # hf
            _save_dataset(records, tmp, tmp / ".cache")
            out = tmp
        card = datasets_dir / "README.md"
        if card.is_file():  # runs exported before cards existed have none
            provenance, counts = dataset_card.read(card)
            (tmp / "README.md").write_text(
                dataset_card.render(kind, provenance, counts, _columns(records), layout=fmt), encoding="utf-8"
            )
    return dest / out.relative_to(tmp)


def _columns(jsonl: Path) -> list[str]:
    columns: dict[str, None] = {}
    for record in read_jsonl(jsonl):
        columns.update(dict.fromkeys(record))
    return list(columns)


def _schema(jsonl: Path):
    """One arrow schema for every record: a column null in the first chunks takes its values' type."""
    import pyarrow as pa

    return pa.unify_schemas(
        [pa.Table.from_pylist(chunk).schema for chunk in _chunks(jsonl)], promote_options="permissive"
    )


def _write_parquet(jsonl: Path, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(jsonl)
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _chunks(jsonl):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


def _save_dataset(jsonl: Path, folder: Path, cache_dir: Path) -> None:
    """A HF `datasets` folder (load_from_disk) from a JSONL file, in chunks: memory does not grow with it.
    The schema is unified over every chunk first, so a column that starts out null (say
    position_consistent without swaps) and holds values later gets the values' type."""
    from datasets import Dataset, Features
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # cai draws its own progress; a second bar per save is noise
    schema = _schema(jsonl)
    dataset = Dataset.from_generator(
        _records, gen_kwargs={"path": str(jsonl)}, features=Features.from_arrow_schema(schema), cache_dir=str(cache_dir)
    )
    dataset.save_to_disk(str(folder))
    del dataset
    shutil.rmtree(cache_dir, ignore_errors=True)


def _records(path: str) -> Iterator[dict[str, Any]]:
    yield from read_jsonl(Path(path))


def _chunks(path: Path, size: int = 1000) -> Iterator[list[dict[str, Any]]]:
    records = read_jsonl(path)
    while chunk := list(itertools.islice(records, size)):
        yield chunk
