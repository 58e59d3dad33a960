"""Exported preference pairs carry each juror's label and the calibration mark, turned to the pair's
chosen/rejected frame, and survive a round trip through `datasets`."""

from __future__ import annotations

import json

import pytest

from cai.generate.export import export


def juror(label: str, p_first: float | None, weight: float, model: str) -> dict:
    return {
        "principle_probs": {"p1": p_first},
        "p_first": p_first,
        "label": label,
        "position_consistent": True,
        "method": "logprobs",
        "model": model,
        "weight": weight,
    }


def row(label: str, p_first: float, **extra) -> dict:
    return {
        "id": "r1",
        "messages": [{"role": "user", "content": "Hi?"}],
        "responses": ["short", "a longer answer"],
        "response": "short",
        "pairs": [
            {
                "answers": [0, 1],
                "votes": [],
                "principle_ids": ["p1"],
                "principle_probs": {"p1": p_first},
                "p_first": p_first,
                "label": label,
                "position_consistent": True,
                "method": "logprobs",
                **extra,
            }
        ],
        "group_id": "r1",
        "constitution_hash": "c",
        "seed": 7,
        "pipeline": "t",
    }


def test_jurors_are_read_in_the_chosen_frame_and_round_trip_through_datasets(tmp_path):
    from datasets import load_from_disk

    jurors = {
        "judge": juror("b", 0.2, 2.0, "m1"),
        "second": juror("a", 0.6, 1.0, "m2"),
        "mute": juror("invalid", None, 1.0, "m3"),
    }
    # the pair's first answer lost (label b): its second answer is `chosen`
    export([row("b", 1 / 3, jurors=jurors)], tmp_path / "datasets")
    [record] = [json.loads(x) for x in (tmp_path / "datasets" / "preferences.jsonl").read_text().splitlines()]
    assert record["chosen"][0]["content"] == "a longer answer" and record["label_prob"] == pytest.approx(2 / 3)
    assert [(j["role"], j["label"], j["p_chosen"], j["weight"], j["model"]) for j in record["jurors"]] == [
        ("judge", "chosen", pytest.approx(0.8), 2.0, "m1"),
        ("second", "rejected", pytest.approx(0.4), 1.0, "m2"),
        ("mute", "invalid", None, 1.0, "m3"),
    ]
    assert "calibration" not in record
    assert load_from_disk(str(tmp_path / "datasets" / "preferences"))[0]["jurors"] == record["jurors"]


def test_a_calibrated_pair_carries_its_calibration_and_a_plain_one_no_new_columns(tmp_path):
    export([row("a", 0.9, calibration="ab12")], tmp_path / "calibrated")
    [record] = [json.loads(x) for x in (tmp_path / "calibrated" / "preferences.jsonl").read_text().splitlines()]
    assert record["calibration"] == "ab12" and "jurors" not in record
    export([row("a", 0.9)], tmp_path / "plain")
    [plain] = [json.loads(x) for x in (tmp_path / "plain" / "preferences.jsonl").read_text().splitlines()]
    assert "calibration" not in plain and "jurors" not in plain
