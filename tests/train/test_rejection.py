"""Rejection sampling (best-of-K) on the tiny model with the rule reward: the winners are the best
samples, fine-tuning on them raises the next iteration's rewards, and a rerun samples nothing again."""

from __future__ import annotations

import json

from synthetic import PROMPTS, write_config

from cai.cli import main


def test_best_of_k_iterations_raise_the_reward(tmp_path, tiny_model, target_tokens, capfd):
    config = write_config(
        tmp_path / "rejection.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / "out"),
        max_steps=24,
        batch_size=16,
        lr=3e-3,
        max_length=192,
        save_every=24,
        seed=2,
        rejection={
            "rewards": [{"name": "share", "rule": "token_fraction", "tokens": target_tokens}],
            "samples": 6,
            "iterations": 2,
            "max_new_tokens": 3,
            "vllm_options": {"kv_cache_memory_bytes": 256 << 20},
        },
    )
    assert main(["train", "rejection", str(config)]) == 0
    out = tmp_path / "out"
    iterations = [json.loads(line) for line in (out / "rejection.jsonl").read_text().splitlines()]
    shown = capfd.readouterr().err  # the sampling phase shows its progress, then each fine-tuning its steps
    prompts = iterations[0]["prompts"]
    for round_ in (1, 2):
        assert f"rejection round {round_}: prompts sampled (6 answers each): {prompts}/{prompts}, " in shown
    assert [i["iteration"] for i in iterations] == [1, 2] and iterations[0]["samples"] == 6 * iterations[0]["prompts"]
    assert all(i["mean_best_reward"] > i["mean_reward"] for i in iterations)
    assert iterations[1]["mean_reward"] > iterations[0]["mean_reward"] + 0.05  # the fine-tuned model samples better

    winners = [json.loads(line) for line in (out / "iteration-1" / "best_of_k.jsonl").read_text().splitlines()]
    assert all(w["reward"] == max(w["sample_rewards"]) and w["messages"][-1]["role"] == "assistant" for w in winners)
    from datasets import load_from_disk

    assert load_from_disk(str(out / "iteration-1" / "best_of_k"))[0]["messages"] == winners[0]["messages"]
    assert (out / "final" / "model.safetensors").exists()
    iteration_2_model = json.loads((out / "iteration-2" / "best_of_k.jsonl").read_text().splitlines()[0])["model"]
    assert iteration_2_model == str(out / "iteration-1" / "sft" / "final")

    before = (out / "iteration-2" / "best_of_k.jsonl").stat().st_mtime_ns
    assert main(["train", "rejection", str(config)]) == 0  # finished: nothing sampled or trained again
    assert (out / "iteration-2" / "best_of_k.jsonl").stat().st_mtime_ns == before
