"""Rows -> datasets others read as they are: TRL's conversational SFT format (`messages`) as a HF
`datasets` folder and as JSONL, plus every full row for tracing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cai.files import canonical_json


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


def export_sft(rows: list[dict[str, Any]], datasets_dir: Path) -> dict[str, int]:
    """Write datasets/sft (HF datasets), datasets/sft.jsonl and datasets/rows.jsonl, all or nothing.

    Flagged rows (empty revision, revision that repeats the critique) stay in rows.jsonl and out of SFT.
    """
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # cai draws its own progress; a second bar per save is noise

    kept = [sft_record(r) for r in rows if not r.get("flags")]
    datasets_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=datasets_dir.parent, prefix=".datasets.tmp-"))
    try:
        (tmp / "rows.jsonl").write_text("".join(canonical_json(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / "sft.jsonl").write_text("".join(canonical_json(r) + "\n" for r in kept), encoding="utf-8")
        if kept:
            Dataset.from_list(kept).save_to_disk(str(tmp / "sft"))
        old = datasets_dir.with_name(f".datasets.old-{os.getpid()}")
        if datasets_dir.exists():
            os.rename(datasets_dir, old)
        os.rename(tmp, datasets_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"sft": len(kept), "flagged": len(rows) - len(kept), "rows": len(rows)}
