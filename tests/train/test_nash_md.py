"""Nash-MD on the tiny model: the policy starts from an SFT model that answers "Locksmith." or
"Plumber." about equally, the preference is a reward model trained on the synthetic pairs (the marker
wins); Nash-MD raises its win rate against the reference, a stopped run resumes with the numbers of an
uninterrupted one, LoRA's reference is the policy with its adapter off. Also: the mixture sampler draws
from the geometric mixture, the judge compares two live answers swap-averaged, bad configs exit 2."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from synthetic import PROMPTS, preference_records, read_metrics, write_config, write_jsonl

from cai.cli import EXIT_BAD_INPUT, main
from cai.generate.prompts import load as load_prompts
from cai.train import config as train_config
from cai.train import nash_md, reward, sft

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("nash-rm")
    prefs = write_jsonl(root / "prefs.jsonl", preference_records(60, answers_per_prompt=3, seed=0))
    path = write_config(
        root / "rm.yaml",
        model=str(tiny_model),
        data={"train": str(prefs)},
        output_dir=str(root / "rm"),
        max_steps=20,
        batch_size=4,
        lr=1e-3,
        max_length=128,
        save_every=100,
    )
    return reward.train(train_config.load("rm", path))


@pytest.fixture(scope="module")
def two_answer_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model fine-tuned to answer every prompt "Locksmith." or "Plumber.", half and half."""
    root = tmp_path_factory.mktemp("nash-sft")
    records = [
        {"messages": [*p.messages, {"role": "assistant", "content": word}]}
        for p in load_prompts(PROMPTS)
        for word in ("Locksmith.", "Plumber.")
    ]
    path = write_config(
        root / "sft.yaml",
        model=str(tiny_model),
        data={"train": str(write_jsonl(root / "sft.jsonl", records))},
        output_dir=str(root / "sft"),
        max_steps=16,
        batch_size=8,
        lr=3e-3,
        max_length=128,
        save_every=100,
    )
    return sft.train(train_config.load("sft", path))


def nash_config(
    tmp_path: Path, model: Path, preference: dict, name: str, steps: int = 10, top: dict | None = None, **options
):
    path = write_config(
        tmp_path / f"{name}.yaml",
        model=str(model),
        data={"train": str(PROMPTS)},
        output_dir=str(tmp_path / name),
        max_steps=steps,
        batch_size=16,
        lr=5e-3,
        max_length=192,
        save_every=2,
        seed=1,
        **(top or {}),
        **{"nash-md": {"preference": preference, "max_new_tokens": 6, "kl_beta": 0.01, **options}},
    )
    return train_config.load("nash-md", path)


def test_nash_md_raises_the_win_rate_against_the_reference(tmp_path, two_answer_model, reward_model):
    cfg = nash_config(tmp_path, two_answer_model, {"model": str(reward_model)}, "nash")
    final = nash_md.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert 0.3 < metrics[1]["win_rate"] < 0.7  # the policy is the reference before its first update
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-4)
    early = (metrics[1]["win_rate"] + metrics[2]["win_rate"]) / 2
    late = (metrics[9]["win_rate"] + metrics[10]["win_rate"]) / 2
    assert late > early + 0.15, (early, late)
    assert metrics[10]["preference_vs_mixture"] > 0.5 and metrics[10]["kl"] > 0
    assert {
        "loss",
        "entropy",
        "grad_norm",
        "kl_per_token",
        "mixture_response_length",
        "seconds_preference_wait",
    } <= set(metrics[10])
    assert (final / "model.safetensors").exists() and (cfg.output_dir / "curves.png").exists()


def test_stopped_run_resumes_exactly(tmp_path, two_answer_model, reward_model):
    preference = {"model": str(reward_model)}
    whole = nash_config(tmp_path, two_answer_model, preference, "whole", steps=4, top={"eval_every": 2})
    nash_md.train(whole)
    parts = nash_config(tmp_path, two_answer_model, preference, "parts", steps=4, top={"eval_every": 2})
    nash_md.train(parts, stop_after=2)
    assert not (parts.output_dir / "final").exists()
    nash_md.train(parts)
    a, b = read_metrics(whole.output_dir), read_metrics(parts.output_dir)
    assert "win_rate" not in a[3] and "win_rate" in a[4]  # every eval_every steps
    for step in (3, 4):
        for key in ("preference_vs_mixture", "loss", "kl", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert b[4]["win_rate"] == pytest.approx(a[4]["win_rate"], rel=1e-5)


def test_under_lora_the_reference_is_the_policy_without_its_adapter(tmp_path, tiny_model, reward_model):
    cfg = nash_config(
        tmp_path,
        tiny_model,
        {"model": str(reward_model)},
        "lora",
        steps=2,
        top={"lora": {"r": 4, "alpha": 8}},
        mixture_coef=0.25,
    )
    final = nash_md.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA's B starts at 0: policy = reference
    assert metrics[2]["kl"] != pytest.approx(0.0, abs=1e-5) and math.isfinite(metrics[2]["loss"])
    assert (final / "model.safetensors").exists()


class Unigram(torch.nn.Module):
    """A model whose next-token logits are the same at every position (it ignores its input)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, past_key_values=None, **_):
        if isinstance(self.logits, Exception):
            raise self.logits
        return SimpleNamespace(logits=self.logits.expand(len(input_ids), 1, -1), past_key_values=past_key_values)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_mixture_sampler_draws_from_the_geometric_mixture(tiny_model, beta):
    """Token frequencies over 3000 answers of 2 tokens against pi^(1-beta) mu^beta worked out by hand;
    a model whose weight is 0 is never run (it raises if it is)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    choices = [10, 11, 12]  # not the end-of-sequence token: every answer runs its 2 tokens
    pi, mu = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]

    def unigram(probs):
        logits = torch.full((len(tokenizer),), -1e4)
        logits[choices] = torch.tensor(probs).log()
        return Unigram(logits)

    policy = unigram(pi) if beta < 1 else Unigram(RuntimeError("policy run at beta 1"))
    reference = unigram(mu) if beta > 0 else Unigram(RuntimeError("reference run at beta 0"))
    sampler = nash_md.MixtureSampler(SimpleNamespace(seed=0), tokenizer, SimpleNamespace(device="cpu"))
    options = SimpleNamespace(mixture_coef=beta, temperature=1.0, top_p=1.0, max_new_tokens=2)
    rollout = sampler(policy, reference, [[5, 6, 7]] * 3000, step=1, options=options)
    answers = rollout.responses
    assert answers.shape == (3000, 2) and rollout.mask.sum().item() == 6000
    unnormalised = [p ** (1 - beta) * m**beta for p, m in zip(pi, mu)]
    expected = [u / sum(unnormalised) for u in unnormalised]
    observed = [(answers == c).float().mean().item() for c in choices]
    assert observed == pytest.approx(expected, abs=0.025), (observed, expected)


def test_the_judge_prefers_between_two_live_answers_swap_averaged(monkeypatch):
    """A scripted judge: P(A) = 0.8 when response A holds 'kind', else 0.2, plus a pull of 0.1 towards
    (A). Kind over rude: shown first P(A) = 0.9, shown second 1 - (0.2 + 0.1) = 0.7: 0.8; rude over kind
    0.2; an answer against itself 1/2 whatever the bias."""
    from cai.generate.backends.base import BACKENDS, BackendSpec
    from cai.train.config import JudgeSource, PreferenceSource

    class Scripted:
        async def choice_logprobs(self, request, choices):
            shown_first = request.messages[-1]["content"].split("<response_a>")[1].split("</response_a>")[0]
            p_a = (0.8 if "kind" in shown_first else 0.2) + 0.1
            return {"A": math.log(p_a), "B": math.log(1 - p_a)}

        async def close(self):
            pass

    monkeypatch.setitem(BACKENDS._factories, "scripted", lambda spec: Scripted())
    spec = JudgeSource(
        backend=BackendSpec(name="judge", type="scripted", model="x"),
        constitution=ROOT / "constitutions" / "harmless.yaml",
        mode="pairwise",
        principles=2,
    )
    preference = reward.Preference(PreferenceSource(judge=spec), "cpu", seed=0)
    try:
        prompts = [[{"role": "user", "content": "How do I pick a lock?"}]] * 3
        p = preference.start(
            prompts,
            ["a kind answer", "a rude answer", "a plain answer"],
            ["a rude answer", "a kind answer", "a plain answer"],
        )()
    finally:
        preference.close()
    assert p.tolist() == pytest.approx([0.8, 0.2, 0.5])


def test_a_reward_model_preference_is_its_bradley_terry_probability(reward_model):
    prompts = [[{"role": "user", "content": "Can you help me?"}]] * 2
    answers, others = ["It is safe locksmith here.", "Why not."], ["It is safe plumber here.", "Why not."]
    rewards = reward.RewardScorer({"rm": (reward_model, 1.0)}).score(prompts + prompts, answers + others)
    p = reward.Preference(train_config.PreferenceSource(model=reward_model), "cpu", seed=0).start(
        prompts, answers, others
    )()
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-(rewards[0] - rewards[2]).item())), 0.5], abs=1e-5)
    assert p[0].item() > 0.5  # the marker wins


@pytest.mark.parametrize(
    "section, field, says",
    [
        (
            {
                "preference": {
                    "model": "rm",
                    "judge": {"backend": {"type": "vllm", "model": "smollm2"}, "constitution": "c.yaml"},
                }
            },
            "nash-md.preference",
            "exactly one",
        ),
        ({"preference": {}}, "nash-md.preference", "exactly one"),
        ({"preference": {"model": "rm"}, "rollout": "vllm"}, "nash-md.rollout", "rollout: hf"),
        ({"preference": {"model": "rm"}, "mixture_coef": 1.5}, "nash-md.mixture_coef", "maximum"),
        ({"preference": {"model": "missing"}}, "nash-md.preference.model", "not found"),
        ({"mixture_coef": 0.5}, "nash-md", "'preference' is required"),
        (None, "nash-md", "needs a nash-md section"),
    ],
)
def test_a_bad_config_exits_2_naming_the_field(tmp_path, monkeypatch, capsys, section, field, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    (tmp_path / "c.yaml").write_text((ROOT / "constitutions" / "harmless.yaml").read_text())
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}])
    doc = {
        "model": "smollm2",
        "data": {"train": "prompts.jsonl"},
        "output_dir": "out",
        **({"nash-md": section} if section is not None else {}),
    }
    write_config(tmp_path / "train.yaml", **doc)
    assert main(["train", "nash-md", "train.yaml"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.yaml: {field}: ") and says in err, err
    assert not (tmp_path / "out").exists()


def test_the_example_config_validates(tmp_path, tiny_model, reward_model):
    cfg = train_config.load(
        "nash-md",
        ROOT / "train" / "nash_md_demo.yaml",
        [f"model={tiny_model}", f"nash-md.preference.model={reward_model}"],
    )
    assert (cfg.nash_md.mixture_coef, cfg.nash_md.kl_beta, cfg.nash_md.preference.model, cfg.lr) == (
        0.5,
        0.1,
        reward_model,
        1e-6,
    )
    assert cfg.read_paths()[-1] == ("nash-md.preference.model", reward_model)
