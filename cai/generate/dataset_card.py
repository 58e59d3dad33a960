"""The Hugging Face dataset card (datasets/README.md) an export writes beside its data: what made the
data (pipeline, constitution and its hash, models, seed, cai version), how many rows it holds and
left out, what each column means, and how to load it with `datasets` and train on it with TRL.

The YAML header is the Hub's dataset-card metadata (`configs` points at the JSONL, so
`load_dataset(folder)` and the Hub viewer both read it); cai's own facts sit under `cai:` in it, so a
program can read them back with `huggingface_hub.DatasetCard.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COLUMNS = {
    "messages": "the conversation: the prompt's turns, then the final answer (the last revision, or the answer when no revision ran)",
    "prompt": "the conversation up to the answers being compared",
    "chosen": "the answer the AI labeler preferred (one assistant turn)",
    "rejected": "the other answer",
    "completion": "one answer (one assistant turn), scored on its own",
    "label": "whether the answer is desirable: its score is above the score stage's `desirable_above` (KTO's label)",
    "score": "the judge's expected score from 1 to 10 (d-RLAIF), averaged over principles",
    "principle_scores": "each principle's expected score",
    "label_prob": "the labeler's probability that `chosen` is better, swap-averaged over principles (soft label)",
    "margin": "log-odds of label_prob: a reward-model margin (Llama 2 style)",
    "principle_ids": "the constitution's principles used for this row",
    "votes": "each principle's probability that `chosen` is better",
    "position_consistent": "whether the labeler's choice survived swapping the answers' order (null when not swapped)",
    "label_method": "logprobs (soft label from option log-probabilities) or parsed (the labeler's stated choice)",
    "jurors": "with a jury: each judge role's own verdict (its model, weight, label as chosen/rejected/tie/invalid, probability that `chosen` is better, position consistency, method); label_prob is their weighted mean",
    "calibration": "with a calibrated judge: the sha256 of the calibration file its probabilities went through",
    "group_id": "answers to the same prompt share it: pairs of one group hold the same prompt",
    "id": "the row's id in the run (rows.jsonl holds the full row: every critique, revision and vote)",
    "prompt_id": "the prompt's id in its prompt file",
    "constitution_hash": "content hash of the constitution that made the row",
    "seed": "the pipeline's seed",
    "models": "the model each role used",
    "pipeline": "the pipeline's name",
}
LEFT_OUT = {
    "sft": {
        "flagged": "flagged rows (an empty revision, one that repeats the critique, or, with a revision check, one the judge does not prefer to the first answer or that refuses a harmless request)"
    },
    "preferences": {
        "ties": "ties (the labeler preferred neither answer)",
        "invalid": "comparisons with no valid label",
    },
    "unpaired": {"unscored": "answers no principle gave a valid score"},
}


@dataclass(frozen=True)
class Provenance:
    """What made a run's data: the card's facts that no row holds."""

    pipeline: str
    constitution: dict[str, Any]  # name, version, hash, principles
    models: dict[str, str]  # role -> model
    seed: int
    versions: dict[str, str] = field(default_factory=dict)  # package -> version, cai's included
    limit: int | None = None


# How each layout holds the records: (the Hub's data_files pattern, its files, the `datasets` call that loads it)
LAYOUTS = {
    "run": (
        "{kind}.jsonl",
        [
            "`{kind}.jsonl`: the records, one JSON object a line",
            "`{kind}/`: the same as a `datasets` folder (`load_from_disk`)",
            "`rows.jsonl`: every row in full (answers, critiques, revisions, each vote), for tracing a record back",
        ],
        'load_dataset("json", data_files="{kind}.jsonl", split="train")  # or datasets.load_from_disk("{kind}")',
    ),
    "jsonl": (
        "{kind}.jsonl",
        ["`{kind}.jsonl`: the records, one JSON object a line"],
        'load_dataset("json", data_files="{kind}.jsonl", split="train")',
    ),
    "parquet": (
        "{kind}.parquet",
        ["`{kind}.parquet`: the records"],
        'load_dataset("parquet", data_files="{kind}.parquet", split="train")',
    ),
    "hf": (
        "data-*.arrow",
        ["`data-*.arrow`, `dataset_info.json`, `state.json`: a `datasets` folder"],
        'load_from_disk("THIS_FOLDER")',
    ),
}


def render(kind: str, provenance: Provenance, counts: dict[str, int], columns: list[str], layout: str = "run") -> str:
    """The card of an export of `kind` (sft, preferences or unpaired) holding `counts` and `columns`, in one of LAYOUTS
    (run: a run's datasets folder)."""
    data_files, files, load = (_fill(x, kind) for x in LAYOUTS[layout])
    n = counts.get(kind, 0)
    files = [line for line in files if n or not line.startswith(f"`{kind}/`")]  # no records: no datasets folder
    header = {
        "pretty_name": f"{provenance.pipeline} ({kind})",
        "tags": ["cai", "constitutional-ai", "synthetic", "sft" if kind == "sft" else "preference"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(n)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        "cai": {
            "pipeline": provenance.pipeline,
            "constitution": provenance.constitution,
            "models": provenance.models,
            "seed": provenance.seed,
            "limit": provenance.limit,
            "versions": provenance.versions,
            "counts": counts,
        },
    }
    c = provenance.constitution
    what = {
        "sft": "supervised fine-tuning data: each prompt answered, critiqued against a principle of the constitution and "
        "revised (Constitutional AI's SL stage)",
        "preferences": "preference pairs: two answers to each prompt compared by an AI labeler under the constitution's "
        "principles (Constitutional AI's RL stage, RLAIF)",
        "unpaired": "unpaired preference data: each answer scored 1-10 by an AI labeler under the constitution's principles "
        "(the RLAIF paper's direct scores) and labelled desirable or not, for KTO",
    }[kind]
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {provenance.pipeline}: {kind}",
        "",
        f"Made by cai {provenance.versions.get('cai', '')}: {what}.",
        "",
        "| | |",
        "|---|---|",
        f"| constitution | {c.get('name')} v{c.get('version')} ({c.get('principles')} principles), hash `{c.get('hash')}` |",
        *(f"| {role} model | `{model}` |" for role, model in provenance.models.items()),
        f"| seed | {provenance.seed} |",
        f"| rows | {n} {kind} records from {counts.get('rows', 0)} pipeline rows"
        + (f" (run with --limit {provenance.limit})" if provenance.limit else "")
        + " |",
        *(f"| left out | {counts[key]} {about} |" for key, about in LEFT_OUT[kind].items() if key in counts),
        "",
        "## Columns",
        "",
        *(f"- `{name}`: {COLUMNS[name]}" if name in COLUMNS else f"- `{name}`" for name in columns),
        "",
        "## Files",
        "",
        *(f"- {line}" for line in files),
        "",
        "## Load and train",
        "",
        "```python",
        "from datasets import load_dataset, load_from_disk",
        "",
        f"data = {load}",
        *_trl_example(kind),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fill(template, kind: str):
    return [t.format(kind=kind) for t in template] if isinstance(template, list) else template.format(kind=kind)


def read(card: Path) -> tuple[Provenance, dict[str, int]]:
    """The provenance and counts a card written by `render` records."""
    text = card.read_text(encoding="utf-8")
    facts = yaml.safe_load(text.split("---", 2)[1])["cai"]
    counts = facts.pop("counts")
    return Provenance(**facts), counts


def _trl_example(kind: str) -> list[str]:
    if kind == "sft":
        return [
            "",
            "from trl import SFTConfig, SFTTrainer  # reads `messages` as it is",
            "",
            'SFTTrainer(model="MODEL", args=SFTConfig(output_dir="sft-out"), train_dataset=data).train()',
        ]
    if kind == "unpaired":
        return [
            "",
            "from trl import KTOConfig, KTOTrainer  # reads prompt/completion/label as they are",
            "",
            'KTOTrainer(model="MODEL", args=KTOConfig(output_dir="kto-out"), train_dataset=data).train()',
        ]
    return [
        "",
        "from trl import DPOConfig, DPOTrainer  # reads prompt/chosen/rejected as they are; RewardTrainer too",
        "",
        'DPOTrainer(model="MODEL", args=DPOConfig(output_dir="dpo-out"), train_dataset=data).train()',
    ]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"
