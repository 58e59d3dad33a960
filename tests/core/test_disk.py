"""Files written whole or not at all, and JSONL read past a line torn by a killed writer."""

from __future__ import annotations

import json

import pytest

from cai.core.disk import read_json_or_none, read_jsonl, write_atomic, written_atomically


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "part-00000.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "tex')
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "manifest.json"
    write_atomic(path, json.dumps({"v": 1}))
    write_atomic(path, json.dumps({"v": 2}))
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plots" / "reliability.png"
    with written_atomically(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".png"  # writers that infer the format from it
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError), written_atomically(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]


def test_read_json_or_none_falls_back_on_a_missing_or_torn_file(tmp_path):
    path = tmp_path / "progress.json"
    assert read_json_or_none(path) is None
    path.write_text('{"stage": "respond", "sta')
    assert read_json_or_none(path) is None
    path.write_text('{"stage": "respond"}')
    assert read_json_or_none(path) == {"stage": "respond"}
