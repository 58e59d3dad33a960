"""Runs split into shards (`cai run --shard K/N`) and merged back (`cai merge`): the merged run is the
unsharded one, byte for byte in its datasets. Over the canned chat server (answers depend on the
request alone), so four runs take seconds."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from canned_server import MODEL, CannedServer
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate.prompts import iter_many
from cai.generate.shards import Shard, shard_of

PROMPTS = Path(__file__).resolve().parents[2] / "prompts" / "red_team_demo.jsonl"
LIMIT = ["--limit", "12"]


def test_shard_of_is_the_ids_hash_modulo_n():
    row_id = "0123456789abcdef"
    digest = hashlib.sha256(row_id.encode()).hexdigest()
    assert shard_of(row_id, 3) == int(digest[:16], 16) % 3
    ids = [p.id for p in iter_many([PROMPTS])]
    shuffled = random.Random(0).sample(ids, len(ids))
    shards = [Shard(k, 3) for k in range(3)]
    # every id in exactly one shard, whatever the order the prompts come in
    assert all(sum(s.holds(i) for s in shards) == 1 for i in ids)
    assert {i for i in shuffled if shards[1].holds(i)} == {i for i in ids if shards[1].holds(i)}


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1-3", "a/b", "0/0"])
def test_a_shard_outside_0_to_n_minus_1_is_refused(text):
    with pytest.raises(ValueError, match="K"):
        Shard.parse(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """One unsharded run and its three shards, over the same canned server."""
    folder = tmp_path_factory.mktemp("shards")
    with CannedServer("--median-s", "0", "--sigma", "0") as server:
        backend = {"type": "openai", "model": MODEL, "base_url": server.url}
        pipeline = tiny_pipeline(
            folder,
            tiny_model,
            rounds=1,
            backends={"b": backend},
            roles={"responder": "b", "critic": "b", "reviser": "b"},
        )
        whole = folder / "whole"
        assert main(["run", str(pipeline), "--run-dir", str(whole), "--quiet", *LIMIT]) == 0
        shards = [folder / f"shard-{k}" for k in range(3)]
        for k, run_dir in enumerate(shards):
            assert main(["run", str(pipeline), "--run-dir", str(run_dir), "--quiet", "--shard", f"{k}/3", *LIMIT]) == 0
        other = folder / "other"
        assert (
            main(
                ["run", str(pipeline), "--run-dir", str(other), "--quiet", "--shard", "0/3", "--set", "seed=8", *LIMIT]
            )
            == 0
        )
    return pipeline, whole, shards, other


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_three_shards_merged_are_the_unsharded_run(runs, tmp_path, capsys):
    pipeline, whole, shards, _ = runs
    per_shard = [{r["id"] for r in lines(d / "datasets" / "rows.jsonl")} for d in shards]
    assert all(per_shard) and sum(map(len, per_shard)) == len(set().union(*per_shard)) == 12
    merged = tmp_path / "merged"
    # any order of the shards' folders
    assert main(["merge", str(shards[2]), str(shards[0]), str(shards[1]), "-o", str(merged)]) == 0
    assert "merged 3 shards" in capsys.readouterr().out
    for name in ("rows.jsonl", "sft.jsonl", "README.md"):
        assert (merged / "datasets" / name).read_bytes() == (whole / "datasets" / name).read_bytes(), name
    from datasets import load_from_disk

    assert (
        load_from_disk(str(merged / "datasets" / "sft")).to_list()
        == load_from_disk(str(whole / "datasets" / "sft")).to_list()
    )
    assert (merged / "report.html").is_file()
    manifest = json.loads((merged / "manifest.json").read_text())
    assert "shard" not in manifest and sorted(i["shard"]["index"] for i in manifest["invocations"]) == [0, 1, 2]
    # its rows live in the shards' folders: cai run there would redo them all, so it is refused
    capsys.readouterr()
    assert main(["run", str(pipeline), "--run-dir", str(merged), "--quiet", *LIMIT]) == 2
    assert "merged_from: this run directory was merged from shards" in capsys.readouterr().err
    assert json.loads((merged / "manifest.json").read_text()) == manifest


def test_merging_shards_that_do_not_belong_together_exits_2_naming_the_shard(runs, tmp_path, capsys):
    pipeline, whole, shards, other = runs
    out = tmp_path / "merged"
    cases = [
        (
            [other, shards[1], shards[2]],
            f"{other / 'manifest.json'}: fingerprint: shard 0/3 was made by another pipeline",
        ),
        ([shards[0], shards[2]], f"{out}: shard 1/3 missing"),
        (
            [shards[0], shards[1], shards[2], shards[1]],
            f"{shards[1] / 'manifest.json'}: shard: shard 1/3 is given twice",
        ),
        ([whole, shards[1], shards[2]], f"{whole / 'manifest.json'}: shard: not a shard"),
    ]
    for run_dirs, says in cases:
        assert main(["merge", *map(str, run_dirs), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == 1, err
        assert not out.exists()  # nothing half written
    # a shard's folder resumes that shard only
    assert main(["run", str(pipeline), "--run-dir", str(shards[0]), "--quiet", "--shard", "1/3", *LIMIT]) == 2
    assert "holds shard 0/3; pass its --shard" in capsys.readouterr().err
