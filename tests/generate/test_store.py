"""The run directory's append-only files survive a writer killed mid-line."""

from __future__ import annotations

from cai.generate.store import RunStore, ShardWriter, read_shards


def test_each_writer_gets_its_own_shard(tmp_path):
    first = ShardWriter(tmp_path)
    first.append([{"id": "a"}])
    (tmp_path / "part-00000.jsonl").open("a").write('{"id": "torn')  # killed mid-write
    second = ShardWriter(tmp_path)
    second.append([{"id": "b"}, {"id": "c"}])
    first.close(), second.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert [r["id"] for r in read_shards(tmp_path)] == ["a", "b", "c"]


def test_writer_creates_nothing_until_it_writes(tmp_path):
    writer = ShardWriter(tmp_path / "stage")
    writer.append([])
    writer.close()
    assert not (tmp_path / "stage").exists()


def test_failure_log_recovers_from_a_torn_line(tmp_path):
    store = RunStore(tmp_path)
    store.record_failures([{"id": "a", "reason": "x"}])
    with open(store.failures_path, "a") as f:
        f.write('{"id": "b", "rea')  # killed mid-write
    store.record_failures([{"id": "c", "reason": "y"}])
    assert [r["id"] for r in store.failures()] == ["a", "c"]
