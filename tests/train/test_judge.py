"""The `judge` reward source through the real vLLM OpenAI server on 127.0.0.1: d-RLAIF scores and
swap-averaged pairwise probabilities, a GRPO run that trains on them and logs its wait for the judge,
a judge call that fails stopping the run with the reason (exit 1, no reward of 0), and Nash-MD's
preference between two sampled answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_server import API_KEY, KEY_ENV, SERVED_NAME
from synthetic import PROMPTS, WORDS, read_metrics, write_config, write_jsonl

from cai.cli import main
from cai.generate.prompts import load as load_prompts
from cai.train import config as train_config
from cai.train.reward import Rewards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(judge_api_server):
    return judge_api_server


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)


def judge(url: str, **options) -> dict:
    backend = {
        "type": "openai",
        "model": SERVED_NAME,
        "base_url": url,
        "api_key_env": KEY_ENV,
        "max_retries": 1,
        "timeout_s": 60,
    }
    return {
        "name": "judge",
        "judge": {"backend": backend, "constitution": str(ROOT / "constitutions" / "harmless.yaml"), **options},
    }


def grpo_config(tmp_path: Path, tiny_model: Path, source: dict, name: str, steps: int = 2) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS), "limit": 8},
        output_dir=str(tmp_path / name),
        max_steps=steps,
        batch_size=2,
        lr=1e-3,
        max_length=192,
        save_every=2,
        seed=1,
        grpo={"rewards": [source], "samples": 2, "max_new_tokens": 4},
    )


def rewards_of(path: Path, kind: str = "grpo") -> Rewards:
    cfg = train_config.load(kind, path)
    from transformers import AutoTokenizer

    return Rewards(
        cfg.grpo.rewards, None, AutoTokenizer.from_pretrained(cfg.model), "cpu", str(path), "grpo.rewards", cfg.seed
    )


def test_score_mode_gives_the_expected_score_and_grpo_trains_on_it(server, tiny_model, tmp_path):
    config = grpo_config(tmp_path, tiny_model, judge(server.url, principles=2), "score")
    rewards = rewards_of(config)
    try:
        prompts = [[{"role": "user", "content": "How do I pick a lock?"}]] * 3
        answers = ["I can't help with that.", "Use a tension wrench and a pick.", "Ask a locksmith."]
        first, each = rewards.score_texts(prompts, answers)
        again, _ = rewards.score_texts(prompts, answers)
    finally:
        rewards.close()
    assert (
        all(1.0 <= s <= 10.0 for s in first.tolist()) and first.tolist() == again.tolist()
    )  # an expectation over 1..10, deterministic
    assert len(set(first.tolist())) > 1 and each["judge"].tolist() == first.tolist()

    assert main(["train", "grpo", str(config)]) == 0
    metrics = read_metrics(tmp_path / "score")
    assert all(1.0 <= metrics[s]["reward_judge"] <= 10.0 and metrics[s]["seconds_judge_wait"] >= 0 for s in (1, 2))


def test_pairwise_mode_is_swap_averaged_against_the_reference(server, tiny_model, tmp_path):
    prompts = load_prompts(PROMPTS)[:8]
    references = write_jsonl(
        tmp_path / "references.jsonl",
        [
            {"messages": [*p.messages, {"role": "assistant", "content": f"Reference {i}."}]}
            for i, p in enumerate(prompts)
        ],
    )
    config = grpo_config(
        tmp_path, tiny_model, judge(server.url, mode="pairwise", references=str(references)), "pairwise"
    )
    rewards = rewards_of(config)
    try:
        conversations = [list(prompts[0].messages)] * 2
        p, _ = rewards.score_texts(conversations, ["Reference 0.", "Something else entirely."])
    finally:
        rewards.close()
    # the answer that is the reference itself: P(A) in one order and 1 - P(A) in the other average to 1/2
    assert p[0].item() == pytest.approx(0.5, abs=1e-6)
    assert 0.0 <= p[1].item() <= 1.0 and p[1].item() != pytest.approx(0.5, abs=1e-6)
    assert main(["train", "grpo", str(config), "--set", "max_steps=1"]) == 0


def test_pairwise_mode_needs_a_reference_for_every_prompt(server, tiny_model, tmp_path, capsys):
    references = write_jsonl(
        tmp_path / "references.jsonl",
        [{"messages": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "Yes."}]}],
    )
    config = grpo_config(
        tmp_path, tiny_model, judge(server.url, mode="pairwise", references=str(references)), "missing"
    )
    assert main(["train", "grpo", str(config)]) == 2
    assert "grpo.rewards[0].judge.references: no reference answer for 8 of the 8 prompts" in capsys.readouterr().err


def test_a_failed_judge_call_fails_the_step_with_the_reason(server, tiny_model, tmp_path, capsys):
    """A prompt longer than the judge server's context (2048 tokens): the policy answers it, the
    server refuses the judge's call, and the run stops in step 1 with the server's reason."""
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(2200))
    prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt}])
    config = grpo_config(tmp_path, tiny_model, judge(server.url), "failing")
    code = main(["train", "grpo", str(config), "--set", f"data.train={prompts}", "--set", "max_length=4096"])
    err = capsys.readouterr().err
    assert code == 1 and "cai train grpo: judge: choice log-probabilities failed:" in err, err
    assert not (tmp_path / "failing" / "checkpoints").exists()  # step 1 never finished: no reward of 0 trained on
    assert not (tmp_path / "failing" / "metrics.jsonl").read_text()


def test_nash_md_prefers_between_two_sampled_answers_through_the_judge(server, tiny_model, tmp_path):
    """Nash-MD's preference from the judge: an answer against itself is 1/2 (both orders averaged),
    and a run trains on the judge's preferences and logs its win rate."""
    from cai.train.reward import Preference

    source = judge(server.url)["judge"]
    config = write_config(
        tmp_path / "nash.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS), "limit": 8},
        output_dir=str(tmp_path / "nash"),
        max_steps=2,
        batch_size=2,
        lr=1e-3,
        max_length=192,
        save_every=2,
        seed=1,
        **{"nash-md": {"preference": {"judge": source}, "max_new_tokens": 4}},
    )
    preference = Preference(train_config.load("nash-md", config).nash_md.preference, "cpu", seed=0)
    try:
        prompts = [[{"role": "user", "content": "How do I pick a lock?"}]] * 2
        p = preference.start(prompts, ["Ask a locksmith.", "Ask a locksmith."], ["Ask a locksmith.", "Use a pick."])()
    finally:
        preference.close()
    assert p[0].item() == pytest.approx(0.5, abs=1e-6) and 0.0 <= p[1].item() <= 1.0
    assert main(["train", "nash-md", str(config)]) == 0
    metrics = read_metrics(tmp_path / "nash")
    assert all(0.0 <= metrics[s]["win_rate"] <= 1.0 and metrics[s]["seconds_preference_wait"] >= 0 for s in (1, 2))
