"""ReST on the tiny model with the rule reward: Grow samples once, each Improve step fine-tunes on the
samples above a rising threshold (a subset of the last step's), the next Grow samples better, and a
run stopped between Improve steps goes on from there without sampling its Grow again."""

from __future__ import annotations

import json

from synthetic import PROMPTS, write_config

from cai.cli import EXIT_INTERRUPTED, main
from cai.train import rest


def test_grow_and_improve_with_rising_thresholds(tmp_path, tiny_model, target_tokens, monkeypatch):
    config = write_config(
        tmp_path / "rest.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        batch_size=16,
        lr=3e-3,
        max_length=192,
        save_every=12,
        seed=2,
        rest={
            "rewards": [{"name": "share", "rule": "token_fraction", "tokens": target_tokens}],
            "samples": 6,
            "grow_steps": 2,
            "thresholds": [0.3, 0.6],
            "max_new_tokens": 3,
            "vllm_options": {"kv_cache_memory_bytes": 256 << 20},
        },
    )
    out = tmp_path / "out"

    # stopped as the second Improve step starts: the first one's fine-tuning is done
    real, calls = rest.fine_tune, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(rest, "fine_tune", interrupted)
    assert main(["train", "rest", str(config)]) == EXIT_INTERRUPTED
    monkeypatch.undo()
    assert (out / "grow-1" / "improve-1" / "sft" / "final").is_dir() and not (out / "grow-2").exists()
    sampled_at = (out / "grow-1" / "samples.jsonl").stat().st_mtime_ns

    assert main(["train", "rest", str(config)]) == 0
    assert (out / "grow-1" / "samples.jsonl").stat().st_mtime_ns == sampled_at  # Grow 1 was not sampled again

    log = [json.loads(line) for line in (out / "rest.jsonl").read_text().splitlines()]
    grows = [r for r in log if "improve" not in r]
    assert [g["grow"] for g in grows] == [1, 2] and all(g["samples"] == 6 * g["prompts"] for g in grows)
    assert grows[1]["mean_reward"] > grows[0]["mean_reward"] + 0.05  # the improved policy samples better
    assert grows[1]["model"] == str(out / "grow-1" / "improve-2" / "sft" / "final")

    for grow in (1, 2):
        steps = [r for r in log if r.get("improve") and r["grow"] == grow]
        assert [s["threshold"] for s in steps] == [0.3, 0.6]
        assert steps[0]["kept"] > steps[1]["kept"] > 0 and steps[0]["mean_kept_reward"] < steps[1]["mean_kept_reward"]
        data = [
            [
                json.loads(line)
                for line in (out / f"grow-{grow}" / f"improve-{i}" / "data.jsonl").read_text().splitlines()
            ]
            for i in (1, 2)
        ]
        keys = [{(r["id"], r["sample"]) for r in d} for d in data]
        assert keys[1] < keys[0]  # each Improve step's data: a strict subset of the last one's
        assert all(r["reward"] >= 0.6 for r in data[1]) and len(data[0]) == steps[0]["kept"]
        samples = [json.loads(line) for line in (out / f"grow-{grow}" / "samples.jsonl").read_text().splitlines()]
        assert len(data[0]) == sum(r["reward"] >= 0.3 for r in samples)  # fine-tuned on what Grow sampled, nothing new
    assert (out / "final" / "model.safetensors").exists()
