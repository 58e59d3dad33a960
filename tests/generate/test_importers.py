from __future__ import annotations

import json

import pytest
from locations import SHARED_DATA

from cai.cli import main
from cai.core.errors import InputError
from cai.generate import constitution
from cai.generate.importers import import_anthropic, import_llm_swarm, transcript_to_messages

ANTHROPIC = SHARED_DATA / "anthropic-cai"


@pytest.fixture(scope="module")
def anthropic():
    return import_anthropic(ANTHROPIC)


def test_anthropic_keeps_every_principle(anthropic):
    raw = json.loads((ANTHROPIC / "CritiqueRevisionInstructions.json").read_text())
    comparisons = json.loads((ANTHROPIC / "RLMadisonInstructions.json").read_text())
    assert [p.id for p in anthropic.principles] == list(raw)
    assert len(anthropic.principles) == 16
    first = anthropic.principles[0]
    assert first.critique.startswith("Identify specific ways in which the assistant")
    assert "CritiqueRequest" not in first.critique and not first.critique.endswith("Critique:")
    assert first.revision.startswith("Please rewrite the assistant response")
    assert "Revision:" not in first.revision
    assert [p.comparison for p in anthropic.principles] == [
        c.strip().removesuffix("Options:").strip() for c in comparisons
    ]


def test_anthropic_few_shot_dialogues(anthropic):
    raw = json.loads((ANTHROPIC / "CritiqueRevisionFewShotPrompts.json").read_text())
    assert len(anthropic.few_shot) == len(raw) == 5
    first = anthropic.few_shot[0]
    assert first[0] == {"role": "user", "content": "Could you help me burn down my house and collect insurance on it?"}
    roles = [m["role"] for m in first]
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert first[-1]["content"].startswith("I'm sorry, I shouldn't have agreed to help.")
    assert any(m["content"].startswith("Identify specific ways") for m in first)


def test_anthropic_round_trip_through_cli(tmp_path, anthropic, capsys):
    out = tmp_path / "anthropic.yaml"
    assert main(["import-constitution", "--format", "anthropic", str(ANTHROPIC), "-o", str(out)]) == 0
    assert main(["validate", str(out)]) == 0
    loaded = constitution.load(out)
    assert loaded.principles == anthropic.principles
    assert loaded.few_shot == anthropic.few_shot
    assert loaded.comparison_few_shot == anthropic.comparison_few_shot and loaded.hash == anthropic.hash


def test_transcript_tags_are_not_confused():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nCritiqueRequest: find harm\n\nCritique: none\n\nRevisionRequest: fix\n\nRevision: done\n\nHuman:"
    assert transcript_to_messages(text) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "find harm"},
        {"role": "assistant", "content": "none"},
        {"role": "user", "content": "fix"},
        {"role": "assistant", "content": "done"},
    ]


def swarm_file(tmp_path, **extra):
    doc = {
        "constitutions": [
            {"critic": "Point out anything harmful in the last answer.", "revision": "Rewrite it without the harm."},
            {"critic": "Is the answer dishonest anywhere?", "revision": "Rewrite it to be honest."},
        ],
        **extra,
    }
    path = tmp_path / "swarm.json"
    path.write_text(json.dumps(doc))
    return path


def test_llm_swarm_principles_and_system_chat(tmp_path):
    chat = [[{"role": "user", "content": "Insult me."}, {"role": "assistant", "content": "I'd rather help you."}]]
    c = import_llm_swarm(swarm_file(tmp_path, system_chat=chat))
    assert [p.critique for p in c.principles] == [
        "Point out anything harmful in the last answer.",
        "Is the answer dishonest anywhere?",
    ]
    assert [p.revision for p in c.principles] == ["Rewrite it without the harm.", "Rewrite it to be honest."]
    assert c.few_shot == tuple(tuple(d) for d in chat)


def test_llm_swarm_round_trip_through_cli(tmp_path):
    out = tmp_path / "swarm.yaml"
    assert main(["import-constitution", "--format", "llm-swarm", str(swarm_file(tmp_path)), "-o", str(out)]) == 0
    assert constitution.load(out).principles == import_llm_swarm(swarm_file(tmp_path)).principles


def test_llm_swarm_bad_entry_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"constitutions": [{"critic": "x"}]}))
    out = tmp_path / "never.yaml"
    assert main(["import-constitution", "--format", "llm-swarm", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"{path}: constitutions[0]:")
    assert not out.exists()


def test_anthropic_comparison_few_shots(anthropic):
    raw = json.loads((ANTHROPIC / "RLMadisonFewShotPrompts.json").read_text())
    assert len(anthropic.comparison_few_shot) == sum(len(e["corrects"]) * len(e["incorrects"]) for e in raw) == 5
    first = anthropic.comparison_few_shot[0]
    assert first.conversation == (
        {"role": "user", "content": "What's the best gun to use to threaten a bank teller during a robbery?"},
    )
    assert first.better.startswith("You should not get involved in robbery")
    assert first.worse.startswith("I think a 45 caliber pistol is best")
    assert all(s.conversation[-1]["role"] == "user" for s in anthropic.comparison_few_shot)


def test_comparison_few_shots_pair_every_correct_with_every_incorrect(tmp_path):
    for name in (
        "CritiqueRevisionInstructions.json",
        "CritiqueRevisionFewShotPrompts.json",
        "RLMadisonInstructions.json",
    ):
        (tmp_path / name).write_text((ANTHROPIC / name).read_text())
    entry = {
        "prompt": "\n\nHuman: Help me cheat.\n\nAssistant:",
        "corrects": ["No.", "I won't."],
        "incorrects": ["Sure."],
    }
    (tmp_path / "RLMadisonFewShotPrompts.json").write_text(json.dumps([entry]))
    shots = import_anthropic(tmp_path).comparison_few_shot
    assert [(s.better, s.worse) for s in shots] == [("No.", "Sure."), ("I won't.", "Sure.")]
    (tmp_path / "RLMadisonFewShotPrompts.json").write_text(json.dumps([{**entry, "incorrects": []}]))
    with pytest.raises(InputError, match=r"RLMadisonFewShotPrompts.json: \[0\]"):
        import_anthropic(tmp_path)
