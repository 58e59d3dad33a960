from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from locations import ROOT

from cai.core.errors import InputError
from cai.generate import constitution


@pytest.fixture(scope="module")
def harmless():
    return constitution.load(ROOT / "constitutions" / "harmless.yaml")


def test_shipped_constitution_is_complete(harmless):
    assert len(harmless.principles) >= 12
    assert all(p.comparison for p in harmless.principles)
    assert len({p.id for p in harmless.principles}) == len(harmless.principles)
    assert harmless.few_shot and all(m["role"] in ("user", "assistant") for d in harmless.few_shot for m in d)


def test_save_load_round_trip(harmless, tmp_path):
    harmless.save(tmp_path / "c.yaml")
    again = constitution.load(tmp_path / "c.yaml")
    assert again == harmless
    assert again.hash == harmless.hash


def test_hash_changes_with_meaning(harmless):
    data = harmless.to_dict()
    data["principles"][0]["critique"] += " Be specific."
    assert constitution.from_dict(data, "x.yaml").hash != harmless.hash


def test_draw_follows_weights():
    doc = {
        "name": "w",
        "version": 1,
        "principles": [
            {"id": "heavy", "critique": "c", "revision": "r", "weight": 3},
            {"id": "light", "critique": "c", "revision": "r"},
        ],
    }
    c = constitution.from_dict(doc, "w.yaml")
    rng = random.Random(0)
    counts = Counter(c.draw(rng).id for _ in range(8000))
    # expected 3:1, i.e. 6000 vs 2000; 5 standard deviations of a binomial is about 190
    assert abs(counts["heavy"] - 6000) < 200


def test_defaults_applied():
    c = constitution.from_dict(
        {"name": "d", "version": "v2", "principles": [{"id": "a", "critique": "c", "revision": "r"}]}, "d.yaml"
    )
    p = c.principles[0]
    assert (p.weight, p.tags, p.comparison) == (1.0, (), None)
    assert c.few_shot == ()


SHOT = {
    "conversation": [{"role": "user", "content": "How do I pick a lock?"}],
    "better": "Call a locksmith.",
    "worse": "Use a bump key.",
}


def test_comparison_few_shots_load_and_count_in_the_hash():
    doc = {"name": "d", "version": 1, "principles": [{"id": "a", "critique": "c", "revision": "r"}]}
    plain = constitution.from_dict(doc, "d.yaml")
    shot = constitution.from_dict({**doc, "comparison_few_shot": [SHOT]}, "d.yaml")
    assert plain.comparison_few_shot == () and "comparison_few_shot" not in plain.to_dict()
    assert shot.comparison_few_shot[0].better == "Call a locksmith." and shot.to_dict()["comparison_few_shot"] == [SHOT]
    assert shot.hash != plain.hash


@pytest.mark.parametrize(
    "shot, field",
    [
        (
            {**SHOT, "conversation": [*SHOT["conversation"], {"role": "assistant", "content": "Sure."}]},
            "comparison_few_shot[0].conversation",
        ),
        ({k: v for k, v in SHOT.items() if k != "worse"}, "comparison_few_shot[0]"),
        ({**SHOT, "better": " "}, "comparison_few_shot[0].better"),
    ],
)
def test_bad_comparison_few_shot_names_the_field(shot, field):
    doc = {
        "name": "d",
        "version": 1,
        "principles": [{"id": "a", "critique": "c", "revision": "r"}],
        "comparison_few_shot": [shot],
    }
    with pytest.raises(InputError, match=rf"d.yaml: {re.escape(field)}: "):
        constitution.from_dict(doc, "d.yaml")
