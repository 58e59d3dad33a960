"""Pipeline files for tests: the shipped constitution and prompts on the tiny model."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(folder: Path, model: Path, rows_in_flight: int = 4, rounds: int = 2, **extra) -> Path:
    doc = {
        "name": "tiny",
        "seed": 7,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": [str(ROOT / "prompts" / "red_team_demo.jsonl")],
        "backends": {
            "local": {
                "type": "vllm",
                "model": str(model),
                "options": {"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
            }
        },
        "roles": {"responder": "local", "critic": "local", "reviser": "local"},
        "stages": [
            {"type": "respond", "max_tokens": 8, "temperature": 0.8},
            {"type": "critique_revise", "rounds": rounds, "few_shot": 1, "max_tokens": 8, "temperature": 0.8},
        ],
        "rows_in_flight": rows_in_flight,
        **extra,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_eval(folder: Path, model: Path, judge: dict | None = None, **extra) -> Path:
    """An eval file: three models on the tiny engine that differ only in how long they may answer (3, 12
    and 40 tokens), rated on the shipped prompts by `judge` (a backend entry; the tiny engine itself by
    default)."""
    local = {
        "type": "vllm",
        "model": str(model),
        "options": {"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
    }
    doc = {
        "name": "tiny_eval",
        "seed": 7,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "backends": {"local": local, **({"judge": judge} if judge else {})},
        "models": {
            "base": {"backend": "local", "max_tokens": 12},
            "terse": {"backend": "local", "max_tokens": 3},
            "verbose": {"backend": "local", "max_tokens": 40},
        },
        "baseline": "base",
        "judge": {"backend": "judge" if judge else "local", "ensemble": 2},
        "axes": {
            "harmless": {"prompts": str(ROOT / "prompts" / "red_team_demo.jsonl")},
            "helpful": {
                "prompts": str(ROOT / "prompts" / "helpful_demo.jsonl"),
                "question": "Which response is more helpful?",
            },
        },
        "generation": {"temperature": 0.0},
        "bootstrap": 200,
        "rows_in_flight": 4,
        **extra,
    }
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
