"""The row browser's reading: filters, pages, failed rows, and two runs joined on their prompts."""

from __future__ import annotations

import json
import shutil

import pytest

from cai.core.errors import InputError
from cai.service import rows
from service.labeling_files import write_workspace


@pytest.fixture
def runs(tmp_path):
    write_workspace(tmp_path)
    first = tmp_path / "runs" / "judged"
    path = first / "datasets" / "rows.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["flags"] = ["empty_revision"]
    records[2]["rounds"] = [{"principle_id": "p9", "critique": "Too CURT.", "revision": "better"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (first / "failures.jsonl").write_text(
        json.dumps({"id": "r7", "stage": "respond", "reason": "timed out"})
        + "\n"
        + json.dumps({"id": "r8", "stage": "compare", "reason": "no choice"})
        + "\n"
    )
    second = tmp_path / "runs" / "other"
    (second / "datasets").mkdir(parents=True)
    shutil.copy(path, second / "datasets" / "rows.jsonl")
    with open(second / "datasets" / "rows.jsonl", "a") as f:
        f.write(
            json.dumps({"id": "only-here", "messages": [{"role": "user", "content": "new"}], "response": "x"}) + "\n"
        )
    return first, second


def ids(page: dict) -> list[str]:
    return [r["id"] for r in page["rows"]]


def test_filters_and_pages(runs):
    run, _ = runs
    everything = rows.browse(run, "runs/judged", rows.RowFilter())
    assert everything["total"] == 6 and ids(everything) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert everything["choices"] == {
        "flag": ["empty_revision"],
        "principle": ["p1", "p2", "p9"],
        "label": ["a", "b", "invalid", "tie"],
    }
    assert ids(rows.browse(run, "x", rows.RowFilter(), offset=2, limit=2)) == ["r3", "r4"]
    assert rows.browse(run, "x", rows.RowFilter(), offset=2, limit=2)["total"] == 6
    assert ids(rows.browse(run, "x", rows.RowFilter(flag="empty_revision"))) == ["r2"]
    assert ids(rows.browse(run, "x", rows.RowFilter(principle="p9"))) == ["r3"]  # a critique's principle
    assert ids(rows.browse(run, "x", rows.RowFilter(label="tie"))) == ["r3"]
    assert ids(rows.browse(run, "x", rows.RowFilter(q="too curt"))) == ["r3"]  # critiques are searched, any case
    assert ids(rows.browse(run, "x", rows.RowFilter(q="R5 REVISED"))) == ["r5"]
    failed = rows.failed(run, stage="compare")
    assert failed["total"] == 1 and failed["failures"][0]["id"] == "r8"
    assert failed["choices"] == {"stage": ["compare", "respond"]}


def test_two_runs_side_by_side(runs):
    first, second = runs
    both = rows.side_by_side(first, "runs/judged", second, "runs/other", rows.RowFilter(), limit=4)
    assert both["shared"] == 6 and both["total"] == 6 and len(both["rows"]) == 4
    assert both["a"]["rows"] == 6 and both["b"]["rows"] == 7
    assert both["a"]["flagged"] == 1 and both["a"]["labels"] == {"a": 3, "b": 1, "tie": 1, "invalid": 1}
    assert all(r["a"]["id"] == r["b"]["id"] == r["id"] for r in both["rows"])
    assert [r["id"] for r in rows.side_by_side(first, "a", second, "b", rows.RowFilter(label="b"))["rows"]] == ["r2"]


def test_a_run_without_rows_is_one_line(tmp_path):
    with pytest.raises(InputError) as info:
        rows.browse(tmp_path, "runs/new", rows.RowFilter())
    assert info.value.render() == "runs/new: the run has not exported its rows yet: they are browsable once it finishes"
