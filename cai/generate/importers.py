"""Importers from other projects' constitution formats into ours."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cai.core.errors import InputError
from cai.core.files import jsonl_records, read_text
from cai.generate.constitution import Constitution, from_dict

ANTHROPIC_FILES = {
    "critique": "CritiqueRevisionInstructions.json",
    "few_shot": "CritiqueRevisionFewShotPrompts.json",
    "comparison": "RLMadisonInstructions.json",
    "comparison_few_shot": "RLMadisonFewShotPrompts.json",
}
# Speaker tags of the paper's transcripts; longer tags first so `Critique` never matches `CritiqueRequest`.
TRANSCRIPT_ROLES = {
    "Human": "user",
    "Assistant": "assistant",
    "CritiqueRequest": "user",
    "Critique": "assistant",
    "RevisionRequest": "user",
    "Revision": "assistant",
}
_TAG = re.compile(r"(?:^|\n\n)(CritiqueRequest|RevisionRequest|Critique|Revision|Human|Assistant):")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(str(path), None, f"invalid JSON: {exc.msg} (line {exc.lineno})") from None


def _strip_tag(text: str, tag: str, next_tag: str, file: str, field: str) -> str:
    match = re.search(rf"{tag}:(.*?)(?:\n\n{next_tag}:|$)", text, flags=re.S)
    if not match or not match.group(1).strip():
        raise InputError(file, field, f"expected text after '{tag}:'")
    return match.group(1).strip()


def transcript_to_messages(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` (with the paper's critique tags) -> chat messages."""
    pieces = _TAG.split(text)
    messages = []
    for tag, content in zip(pieces[1::2], pieces[2::2]):
        if content.strip():
            messages.append({"role": TRANSCRIPT_ROLES[tag], "content": content.strip()})
    return messages


def load_pairs(path: str | Path, limit: int | None = None, skip: int = 0) -> list[dict[str, Any]]:
    """`{"chosen", "rejected"}` transcripts -> the shared context and the two final assistant answers;
    the first `skip` records are passed over unchecked (pairs 801-1000: skip 800, limit 200)."""
    file = str(path)
    pairs = []
    for index, (lineno, obj) in enumerate(jsonl_records(file, read_text(path))):
        if index < skip:
            continue
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("chosen", "rejected")):
            raise InputError(file, None, "expected an object with 'chosen' and 'rejected' transcripts", line=lineno)
        chosen, rejected = _turns(obj["chosen"]), _turns(obj["rejected"])
        for key, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise InputError(
                    file, key, "the transcript must end with an Assistant turn after a Human turn", line=lineno
                )
        pairs.append(
            {
                "line": lineno,
                "context": chosen[:-1],
                "chosen": chosen[-1]["content"],
                "rejected": rejected[-1]["content"],
            }
        )
        if limit is not None and len(pairs) == limit:
            break
    if not pairs:
        raise InputError(file, None, f"no pairs after the {skip} skipped" if skip else "no pairs in file")
    return pairs


def _turns(transcript: str) -> list[dict[str, str]]:
    messages = transcript_to_messages(transcript)
    if transcript.rstrip().endswith("Assistant:"):
        messages.append({"role": "assistant", "content": ""})  # HH has empty final answers, sometimes the chosen one
    return messages


def comparison_shots(path: Path) -> list[dict[str, Any]]:
    """RLMadisonFewShotPrompts: `{prompt: transcript, corrects: [...], incorrects: [...]}` -> one
    `comparison_few_shot` entry per (correct, incorrect) combination, in file order."""
    file = str(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise InputError(file, None, "expected a list of {'prompt', 'corrects', 'incorrects'} objects")
    shots = []
    for index, entry in enumerate(data):
        try:
            conversation = transcript_to_messages(entry["prompt"])
            pairs = [(c.strip(), i.strip()) for c in entry["corrects"] for i in entry["incorrects"]]
        except (KeyError, TypeError, AttributeError):
            raise InputError(
                file, f"[{index}]", "expected {'prompt': transcript, 'corrects': [texts], 'incorrects': [texts]}"
            ) from None
        if not conversation or conversation[-1]["role"] != "user" or not pairs:
            raise InputError(
                file,
                f"[{index}]",
                "expected a transcript ending with a Human turn, and at least one correct and one incorrect answer",
            )
        shots += [{"conversation": conversation, "better": better, "worse": worse} for better, worse in pairs]
    return shots


def import_anthropic(folder: str | Path) -> Constitution:
    """The Constitutional AI paper's files: 16 critique/revision principles, their few-shot transcripts,
    the 16 comparison principles (attached to the principles in file order) and the comparison
    few-shots."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(str(folder), None, "expected the folder holding the paper's JSON files")
    paths = {k: folder / v for k, v in ANTHROPIC_FILES.items()}
    critiques = _load_json(paths["critique"])
    if not isinstance(critiques, dict) or not critiques:
        raise InputError(str(paths["critique"]), None, "expected a non-empty object of principles")
    comparisons = _load_json(paths["comparison"])
    if not isinstance(comparisons, list) or len(comparisons) != len(critiques):
        raise InputError(
            str(paths["comparison"]),
            None,
            f"expected a list of {len(critiques)} comparison principles, one per critique principle",
        )
    principles = []
    for (key, entry), comparison in zip(critiques.items(), comparisons):
        file = str(paths["critique"])
        try:
            critique_text, revision_text = entry["prompt"][0], entry["edit_request"]
        except (KeyError, IndexError, TypeError):
            raise InputError(
                file, key, "expected {'prompt': [critique request], 'edit_request': revision request}"
            ) from None
        principles.append(
            {
                "id": key,
                "critique": _strip_tag(critique_text, "CritiqueRequest", "Critique", file, f"{key}.prompt"),
                "revision": _strip_tag(revision_text, "RevisionRequest", "Revision", file, f"{key}.edit_request"),
                "comparison": re.sub(r"\s*Options:\s*$", "", comparison.strip()),
            }
        )
    few_shot = [transcript_to_messages(t) for t in _load_json(paths["few_shot"])]
    doc = {
        "name": "anthropic-cai",
        "version": "bai-2022",
        "description": "Imported from the supplementary material of Bai et al. 2022, Constitutional AI: Harmlessness from AI Feedback.",
        "principles": principles,
        "few_shot": [d for d in few_shot if d],
        "comparison_few_shot": comparison_shots(paths["comparison_few_shot"]),
    }
    return from_dict(doc, str(folder))


def import_llm_swarm(path: str | Path) -> Constitution:
    """llm-swarm's constitution JSON: {"constitutions": [{"critic", "revision"}], "system_chat": [[messages]]}."""
    path = Path(path)
    file = str(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("constitutions"), list):
        raise InputError(file, "constitutions", "expected a list of {'critic', 'revision'} objects")
    principles = []
    for index, entry in enumerate(data["constitutions"]):
        if not isinstance(entry, dict) or not {"critic", "revision"} <= set(entry):
            raise InputError(file, f"constitutions[{index}]", "expected an object with 'critic' and 'revision'")
        principles.append({"id": f"principle_{index:02d}", "critique": entry["critic"], "revision": entry["revision"]})
    doc = {"name": path.stem, "version": 1, "principles": principles}
    if data.get("system_chat"):
        doc["few_shot"] = data["system_chat"]
    return from_dict(doc, file)


IMPORTERS = {"anthropic": import_anthropic, "llm-swarm": import_llm_swarm}
