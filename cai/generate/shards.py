"""A run split into shards that run anywhere (`cai run --shard K/N`, one per Slurm array task or
Kubernetes indexed-Job pod), and the shards merged back into one run (`cai merge`).

A row belongs to shard K of N by the hash of its stable id, so the shards are disjoint and complete
whatever order the prompt files are in. K counts from 0, as Kubernetes' JOB_COMPLETION_INDEX does
(a Slurm array declared `--array=0-$((N-1))` gives the same). The merged run's datasets are the ones
one unsharded run writes, byte for byte: the rows are read back in input order and exported by the
same code.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.core.disk import replaced_folder
from cai.core.errors import InputError
from cai.core.files import sha256_file
from cai.generate import dataset_card
from cai.generate import prompts as prompts_mod
from cai.generate.export import export
from cai.generate.prompts import Prompt
from cai.generate.records import Row
from cai.generate.store import Location, RunStore, ShardReader


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """`K/N` with 0 <= K < N; raises ValueError saying what is wrong."""
        k, sep, n = text.partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"expected K/N (shard K of N, K from 0), got {text!r}")
        shard = cls(int(k), int(n))
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ValueError(f"shard {text}: K counts from 0 to N-1 (JOB_COMPLETION_INDEX, or --array=0-$((N-1)))")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, row_id: str) -> bool:
        return shard_of(row_id, self.count) == self.index

    def select(self, prompts: Iterable[Prompt]) -> Iterator[Prompt]:
        return (p for p in prompts if self.holds(p.id))

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def shard_of(row_id: str, count: int) -> int:
    """The shard (0-based) of `count` a row id falls in: uniform whatever the ids look like."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") % count


@dataclass
class MergeSummary:
    run_dir: Path
    shards: int
    exported: dict[str, int]
    failed: int


def merge(run_dirs: list[Path], out: Path) -> MergeSummary:
    """Check that `run_dirs` are every shard of one run, once each, and write the run they make up to
    the new folder `out`: its manifest (every shard's invocations), failures, datasets and card. All
    or nothing: any problem raises InputError naming the shard, before anything is written."""
    if out.exists() and any(out.iterdir()):
        raise InputError(str(out), None, "exists and is not empty: name a new folder")
    manifests = [_shard_manifest(d) for d in run_dirs]
    # The shards hold one run's fingerprint, the foreign one(s) another: the most common one is the run's.
    common = Counter(m["fingerprint"] for m in manifests).most_common(1)[0][0]
    first_dir, first = next((d, m) for d, m in zip(run_dirs, manifests) if m["fingerprint"] == common)
    count = first["shard"]["count"]
    seen: dict[int, Path] = {}
    for run_dir, manifest in zip(run_dirs, manifests):
        where = str(run_dir / "manifest.json")
        shard = Shard(**manifest["shard"])
        if manifest["fingerprint"] != first["fingerprint"]:
            raise InputError(
                where,
                "fingerprint",
                f"shard {shard} was made by another pipeline, constitution or prompt set than {first_dir}",
            )
        if shard.count != count:
            raise InputError(where, "shard", f"shard {shard} is one of {shard.count}, {first_dir} one of {count}")
        if shard.index in seen:
            raise InputError(where, "shard", f"shard {shard} is given twice (also {seen[shard.index]})")
        if _limit(manifest) != _limit(first):
            raise InputError(
                where,
                "invocations",
                f"shard {shard} ran with --limit {_limit(manifest)}, {first_dir} with {_limit(first)}",
            )
        seen[shard.index] = run_dir
    missing = [str(Shard(k, count)) for k in range(count) if k not in seen]
    if missing:
        raise InputError(str(out), None, f"shard {', '.join(missing)} missing: pass every shard's run directory")
    for entry in first["prompts"]:
        if not Path(entry["path"]).is_file() or sha256_file(Path(entry["path"])) != entry["sha256"]:
            raise InputError(
                entry["path"],
                None,
                "the prompt file the shards ran on is gone or changed: merge needs it for the rows' order",
            )

    final_stage = first["config"]["stages"][-1]
    index: dict[str, Location] = {}
    for run_dir in run_dirs:
        index.update(RunStore(run_dir).stage_index(final_stage.get("name", final_stage["type"])))
    provenance, _ = dataset_card.read(first_dir / "datasets" / "README.md")
    failures = [f for run_dir in run_dirs for f in RunStore(run_dir).failures()]
    reader = ShardReader()
    try:
        with replaced_folder(out) as tmp:
            store = RunStore(tmp)
            prompts = itertools.islice(
                prompts_mod.iter_many([Path(e["path"]) for e in first["prompts"]]), _limit(first)
            )
            rows = rows_in_order(prompts, index, reader)  # as one unsharded run's export reads them
            exported = export(rows, store.datasets_dir, provenance)
            store.record_failures(failures)
            store.write_manifest(_merged_manifest(first, run_dirs, manifests))
    finally:
        reader.close()
    return MergeSummary(run_dir=out, shards=count, exported=exported, failed=len({f["id"] for f in failures}))


def rows_in_order(prompts: Iterable[Prompt], final: dict[str, Location], reader: ShardReader) -> Iterator[Row]:
    """Finished rows in input order, read back one at a time: how a run's export reads its rows, and a
    merge its shards' (so both write the same bytes)."""
    for prompt in prompts:
        location = final.get(prompt.id)
        if location is not None:
            yield reader.read(location)


def _shard_manifest(run_dir: Path) -> dict[str, Any]:
    manifest = RunStore(run_dir).read_manifest()
    if manifest is None:
        raise InputError(str(run_dir), None, "not a cai run directory (no manifest.json)")
    if "shard" not in manifest:
        raise InputError(str(run_dir / "manifest.json"), "shard", "not a shard: this run was made without --shard K/N")
    if not (run_dir / "datasets" / "README.md").is_file():
        raise InputError(
            str(run_dir), None, f"shard {Shard(**manifest['shard'])} has not finished: run it again to the end"
        )
    return manifest


def _limit(manifest: dict[str, Any]) -> int | None:
    return manifest["invocations"][-1]["limit"]


def _merged_manifest(first: dict[str, Any], run_dirs: list[Path], manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The first shard's manifest without its shard, with every shard's invocations (the report's time
    and cost add them up) and where the shards were."""
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged["merged_from"] = [{"run_dir": str(d.resolve()), "shard": m["shard"]} for d, m in zip(run_dirs, manifests)]
    merged["invocations"] = [{**i, "shard": m["shard"]} for m in manifests for i in m["invocations"]]
    return merged
