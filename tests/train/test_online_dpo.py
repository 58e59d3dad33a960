"""Online DPO on the tiny model: the policy starts from an SFT model that answers "Locksmith." or
"Plumber." about equally; a scripted judge (the compare stage's questions, answered in-process) prefers
the answer that names a locksmith. Online DPO raises the win rate against the reference on held-out
prompts, with hard and soft labels; a failed judge call stops the step with its reason; a stopped run
resumes with the numbers of an uninterrupted one; a reward model labels pairs by Bradley-Terry; the
pairs chosen per prompt; bad configs exit 2 naming the field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from synthetic import PROMPTS, WORDS, read_metrics, write_config, write_jsonl

import cai.generate.backends  # noqa: F401  (registers the backend types the scripted judge replaces)
from cai.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from cai.generate.backends.base import BACKENDS, BackendCallError
from cai.train import config as train_config
from cai.train import online_dpo
from cai.train.reward import JudgeError

ROOT = Path(__file__).resolve().parents[2]
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


class ScriptedJudge:
    """Answers the compare stage's question by a rule: the better answer is the one with the larger share
    of its tokens among the marker tokens (about 30% of the vocabulary: conftest's target_tokens, PPO's
    rule), P(A) = sigmoid(8 (share_A - share_B)), plus a pull of 0.05 towards (A), so that a pair it can
    hardly tell apart is position inconsistent. `fail`: every call raises as an API backend does after
    its retries."""

    tokenizer = None
    marker_ids: set[int] = set()

    def __init__(self, fail: bool = False):
        self.fail = fail

    @classmethod
    def share(cls, text: str) -> float:
        ids = cls.tokenizer.encode(text, add_special_tokens=False)
        return sum(i in cls.marker_ids for i in ids) / max(len(ids), 1)

    async def choice_logprobs(self, request, choices):
        if self.fail:
            raise BackendCallError("judge: choice log-probabilities failed: HTTP 503 after 2 retries")
        text = request.messages[-1]["content"]
        a = text.split("<response_a>\n")[1].split("\n</response_a>")[0]
        b = text.split("<response_b>\n")[1].split("\n</response_b>")[0]
        p_a = min(1 / (1 + math.exp(-8 * (self.share(a) - self.share(b)))) + 0.05, 0.999)
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}

    async def close(self):
        pass


@pytest.fixture
def scripted(monkeypatch, tiny_model, target_tokens):
    """The `openai` backend type answered by ScriptedJudge (the config is a real API judge's)."""
    from transformers import AutoTokenizer

    ScriptedJudge.tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ScriptedJudge.marker_ids = {ScriptedJudge.tokenizer.encode(t, add_special_tokens=False)[0] for t in target_tokens}
    monkeypatch.setitem(BACKENDS._factories, "openai", lambda spec: ScriptedJudge(fail="fail" in spec.model))


def judge(model: str = "scripted", **options) -> dict:
    backend = {"type": "openai", "model": model, "base_url": "http://127.0.0.1:9/v1"}
    return {"judge": {"backend": backend, "constitution": str(CONSTITUTION), **options}}


def online_config(tmp_path: Path, model: Path, name: str, preference: dict | None = None, steps: int = 12, **options):
    doc = {
        "model": str(model),
        "data": {"train": str(PROMPTS), "eval_fraction": 0.5},  # 24 of the 48 prompts held out
        "output_dir": str(tmp_path / name),
        "max_steps": steps,
        "batch_size": 12,
        "lr": 2e-2,
        "max_length": 192,
        "save_every": 2,
        "seed": 1,
        **options.pop("top", {}),
    }
    path = write_config(
        tmp_path / f"{name}.yaml",
        **doc,
        **{
            "online-dpo": {
                "preference": preference or judge(),
                "samples": 4,
                "max_new_tokens": 6,
                "beta": 0.1,
                **options,
            }
        },
    )
    return train_config.load("online-dpo", path)


@pytest.mark.parametrize("soft", [False, True])
def test_online_dpo_raises_the_win_rate_against_the_reference(tmp_path, tiny_model, scripted, soft):
    cfg = online_config(tmp_path, tiny_model, "soft" if soft else "hard", use_soft_labels=soft)
    final = online_dpo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert 0.3 < metrics[1]["win_rate"] < 0.7  # the policy is the reference before its first update
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-4)
    late = (metrics[11]["win_rate"] + metrics[12]["win_rate"]) / 2
    assert late > metrics[1]["win_rate"] + 0.2 and late > 0.7, [metrics[s]["win_rate"] for s in metrics]
    assert metrics[12]["kl"] > 0 and metrics[12]["reward_accuracy"] >= 0.5
    # the scripted judge's pull towards (A) turns its verdict on pairs it can hardly tell apart
    consistency = [metrics[s]["position_consistency"] for s in metrics]
    assert all(0 <= c <= 1 for c in consistency) and min(consistency) < 1
    assert all(0 < metrics[s]["label_confidence"] < 1 for s in metrics)
    assert metrics[1]["judge_calls"] == 2 * metrics[1]["judged_pairs"]  # both orders, one principle
    assert {"seconds_judge_wait", "judge_wait_share", "seconds_policy_forward", "entropy", "grad_norm"} <= set(
        metrics[12]
    )
    assert (final / "model.safetensors").exists() and (cfg.output_dir / "curves.png").exists()


def test_a_failed_judge_call_fails_the_step_with_the_reason(tmp_path, tiny_model, scripted, capsys):
    cfg = online_config(tmp_path, tiny_model, "failing", judge(model="fail"))
    with pytest.raises(JudgeError, match="judge: choice log-probabilities failed: HTTP 503 after 2 retries"):
        online_dpo.train(cfg)
    assert not (cfg.output_dir / "checkpoints").exists()  # step 1 never finished: nothing trained on
    assert not (cfg.output_dir / "metrics.jsonl").read_text()
    # the command says it in one line and exits 1
    code = main(["train", "online-dpo", str(cfg.file), "--set", f"output_dir={tmp_path / 'failing-cli'}"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and "cai train online-dpo: judge: choice log-probabilities failed: HTTP 503" in err, err


def test_stopped_run_resumes_exactly(tmp_path, tiny_model, scripted):
    options = {"samples": 3, "pairs": "all", "top": {"eval_every": 2}}
    whole = online_config(tmp_path, tiny_model, "whole", steps=4, **options)
    online_dpo.train(whole)
    parts = online_config(tmp_path, tiny_model, "parts", steps=4, **options)
    online_dpo.train(parts, stop_after=2)
    assert not (parts.output_dir / "final").exists()
    online_dpo.train(parts)
    a, b = read_metrics(whole.output_dir), read_metrics(parts.output_dir)
    assert "win_rate" not in a[3] and "win_rate" in a[4]  # every eval_every steps
    for step in (3, 4):
        for key in ("loss", "kl", "entropy", "pairs", "label_confidence", "position_consistency"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert b[4]["win_rate"] == pytest.approx(a[4]["win_rate"], rel=1e-5)
    assert a[3]["judged_pairs"] <= 3 * 12  # every pair of 3 answers, equal answers left out


def test_sigkill_then_rerun_resumes_exactly(tmp_path, tiny_model, reward_model):
    """`cai train online-dpo` killed with SIGKILL after a checkpoint, then run again: the steps after the
    checkpoint have the uninterrupted run's numbers (sampling seeded per step, labels a pure function)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    preference = {"model": str(reward_model)}
    options = {"steps": 6, "top": {"save_every": 1, "keep_checkpoints": 3}}
    straight = online_config(tmp_path, tiny_model, "straight", preference, **options)
    online_dpo.train(straight)
    killed = online_config(tmp_path, tiny_model, "killed", preference, **options)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai.cli", "train", "online-dpo", str(killed.file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    out = killed.output_dir
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    saved = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < 6, "the run was killed before it finished"

    assert main(["train", "online-dpo", str(killed.file)]) == 0
    expected, resumed = read_metrics(straight.output_dir), read_metrics(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(saved[-1] + 1, 7):
        for key in ("loss", "kl", "pairs", "label_confidence", "win_rate"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_vllm_rollouts_sample_from_the_policy_after_each_sync(tmp_path, tiny_model, scripted):
    """The rollout engine gets the policy's weights before every step's sampling (the sync is logged), and
    the win rate rises as with HF generation."""
    cfg = online_config(tmp_path, tiny_model, "vllm", rollout="vllm", vllm_options={"kv_cache_memory_bytes": 256 << 20})
    online_dpo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert all(metrics[s]["seconds_weight_sync"] > 0 for s in metrics)
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-4) and metrics[12]["kl"] > 0
    late = (metrics[11]["win_rate"] + metrics[12]["win_rate"]) / 2
    assert late > metrics[1]["win_rate"] + 0.2, [metrics[s]["win_rate"] for s in metrics]


@pytest.fixture
def server(judge_api_server):
    return judge_api_server


def test_the_judge_through_the_real_api_server(server, tiny_model, tmp_path, monkeypatch, capsys):
    """The judge a real vLLM OpenAI server on 127.0.0.1: a run trains on its labels (both orders: two
    calls a pair) and measures the win rate; a prompt longer than the server's context (2048 tokens) makes
    the server refuse the judge's call, and step 1 stops with the server's reason (exit 1, nothing saved)."""
    from api_server import API_KEY, KEY_ENV, SERVED_NAME

    monkeypatch.setenv(KEY_ENV, API_KEY)
    backend = {
        "type": "openai",
        "model": SERVED_NAME,
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "max_retries": 1,
        "timeout_s": 60,
    }
    config = write_config(
        tmp_path / "api.yaml",
        model=str(tiny_model),
        data={"train": str(PROMPTS), "limit": 8, "eval_fraction": 0.25},
        output_dir=str(tmp_path / "api"),
        max_steps=2,
        batch_size=2,
        lr=1e-3,
        max_length=192,
        save_every=2,
        seed=1,
        **{
            "online-dpo": {
                "preference": {"judge": {"backend": backend, "constitution": str(CONSTITUTION), "principles": 2}},
                "max_new_tokens": 4,
            }
        },
    )
    assert main(["train", "online-dpo", str(config)]) == 0
    metrics = read_metrics(tmp_path / "api")
    for step in (1, 2):
        assert metrics[step]["judge_calls"] == 4 * metrics[step]["judged_pairs"]  # 2 principles, both orders
        assert 0 <= metrics[step]["win_rate"] <= 1 and metrics[step]["seconds_judge_wait"] >= 0

    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(2200))
    prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt}])
    overrides = [f"data.train={prompts}", "max_length=4096", f"output_dir={tmp_path / 'failing'}"]
    code = main(["train", "online-dpo", str(config), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and "cai train online-dpo: judge: choice log-probabilities failed:" in err, err
    assert not (tmp_path / "failing" / "checkpoints").exists()


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a seeded random scalar head: a reward model as `cai train rm` writes one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("online-dpo") / "reward-model"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_a_reward_model_labels_pairs_by_bradley_terry(tmp_path, tiny_model, reward_model):
    """The reward model labels: P = sigmoid(r_i - r_j), a run takes its steps with its seconds logged."""
    folder = reward_model
    labeller = online_dpo.PairLabeller(train_config.PairPreferenceSource(model=folder), "cpu", seed=0)
    prompts = [[{"role": "user", "content": "Can you help me?"}]] * 2
    labels = labeller.start(prompts, [["Yes.", "No.", "Yes."], ["A", "B", "C"]], step=1)()
    rewards = labeller.scorer.score([prompts[0]] * 3, ["Yes.", "No.", "Yes."])
    assert labels.p[0, 0, 1].item() == pytest.approx(torch.sigmoid(rewards[0] - rewards[1]).item(), abs=1e-5)
    assert labels.judged[0].tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    assert labels.p[0, 0, 2].item() == 0.5 and labels.p[1].diagonal().tolist() == [0.5] * 3

    cfg = online_config(tmp_path, tiny_model, "rm", {"model": str(folder)}, steps=2, loss_type="ipo")
    online_dpo.train(cfg)
    metrics = read_metrics(cfg.output_dir)
    assert all(math.isfinite(metrics[s]["loss"]) and "seconds_reward_model" in metrics[s] for s in (1, 2))
    assert "position_consistency" not in metrics[1] and 0 <= metrics[2]["win_rate"] <= 1


class AlwaysA:
    """A juror that answers (A) with P 0.7 whatever it is shown: its swap average is 1/2."""

    async def choice_logprobs(self, request, choices):
        return {"A": math.log(0.7), "B": math.log(0.3)}

    async def close(self):
        pass


def test_the_judge_calibrated_or_as_a_jury(tmp_path, tiny_model, scripted, monkeypatch):
    """The compare stage's own arithmetic: a calibration rescales each vote's log-odds before the orders are
    averaged; a jury's label is its jurors' weighted mean."""
    monkeypatch.setitem(
        BACKENDS._factories, "openai", lambda spec: AlwaysA() if spec.model == "always-a" else ScriptedJudge()
    )
    prompts = [[{"role": "user", "content": "Can you help me?"}]]
    marked = ScriptedJudge.tokenizer.convert_ids_to_tokens(min(ScriptedJudge.marker_ids))
    answers = [[ScriptedJudge.tokenizer.convert_tokens_to_string([marked] * 3), "Why not."]]
    share_gap = ScriptedJudge.share(answers[0][0]) - ScriptedJudge.share(answers[0][1])
    assert share_gap > 0.5

    def p_a(gap: float) -> float:  # the scripted judge's P(A) when A's share exceeds B's by `gap`
        return min(1 / (1 + math.exp(-8 * gap)) + 0.05, 0.999)

    def labels(preference: dict):
        cfg = online_config(tmp_path, tiny_model, "labels", preference)
        labeller = online_dpo.PairLabeller(cfg.online_dpo.preference, "cpu", seed=0)
        try:
            return labeller.start(prompts, answers, step=1)()
        finally:
            labeller.close()

    plain = labels(judge()).p[0, 0, 1].item()
    assert plain == pytest.approx((p_a(share_gap) + 1 - p_a(-share_gap)) / 2)

    calibration = tmp_path / "calibration.json"
    calibration.write_text('{"temperature": 2.0, "position_offset": 0.0}')
    calibrated = labels(judge(calibration=str(calibration))).p[0, 0, 1].item()

    def halved(p: float) -> float:  # sigmoid(logit(p) / 2)
        return 1 / (1 + math.sqrt((1 - p) / p))

    assert calibrated == pytest.approx((halved(p_a(share_gap)) + 1 - halved(p_a(-share_gap))) / 2)
    assert 0.5 < calibrated < plain

    backend = judge()["judge"]["backend"]
    jury = {
        "jury": {"rule": {"backend": backend, "weight": 3}, "biased": {"backend": {**backend, "model": "always-a"}}}
    }
    judged = labels({"judge": {**jury, "constitution": str(CONSTITUTION)}})
    assert judged.p[0, 0, 1].item() == pytest.approx((3 * plain + 0.5) / 4)
    assert judged.calls == 4  # two jurors, both orders
    assert judged.consistent == [False]  # the biased juror flips with the order


def test_choose_pairs_best_against_worst_or_all():
    # one prompt, K = 3: P(i beats j); answer 2 beats both others, answer 1 loses to both
    p = torch.tensor([[[0.5, 0.7, 0.2], [0.3, 0.5, 0.1], [0.8, 0.9, 0.5]]])
    judged = torch.tensor([[[False, True, True], [False, False, True], [False, False, False]]])
    chosen, rejected, target = online_dpo.choose_pairs(p, judged, "best_vs_worst", soft=True, tie_threshold=0.05)
    assert (chosen.tolist(), rejected.tolist(), target.tolist()) == ([2], [1], pytest.approx([0.9]))
    chosen, rejected, target = online_dpo.choose_pairs(p, judged, "all", soft=False, tie_threshold=0.05)
    assert (chosen.tolist(), rejected.tolist(), target.tolist()) == (
        [0, 2, 2],
        [1, 0, 1],
        pytest.approx([0.7, 0.8, 0.9]),
    )
    # a second prompt: hard labels leave a tie out; an unjudged best-worst pair (equal answers) gives none
    p = torch.tensor([[[0.5, 0.52], [0.48, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    judged = torch.tensor([[[False, True], [False, False]], [[False, False], [False, False]]])
    assert online_dpo.choose_pairs(p, judged, "all", soft=False, tie_threshold=0.05)[0].tolist() == []
    chosen, rejected, target = online_dpo.choose_pairs(p, judged, "best_vs_worst", soft=True, tie_threshold=0.05)
    assert (chosen.tolist(), rejected.tolist(), target.tolist()) == ([0], [1], pytest.approx([0.52]))


@pytest.mark.parametrize(
    "section, field, says",
    [
        ({"preference": {"model": "rm", **judge()}}, "online-dpo.preference", "exactly one"),
        ({"preference": {}}, "online-dpo.preference", "exactly one"),
        ({"preference": {"model": "missing"}}, "online-dpo.preference.model", "not found"),
        ({"preference": {"model": "rm"}, "samples": 1}, "online-dpo.samples", "minimum"),
        (
            {"preference": {"model": "rm"}, "loss_type": "cpl"},
            "online-dpo.loss_type",
            "must be one of sigmoid, ipo, hinge",
        ),
        ({"preference": {"model": "rm"}, "pairs": "some"}, "online-dpo.pairs", "must be one of best_vs_worst, all"),
        ({"preference": {"model": "rm"}, "kl_beta": 0.1}, "online-dpo", "kl_beta"),
        (
            {"preference": {"judge": {"constitution": "c.yaml"}}},
            "online-dpo.preference.judge",
            "exactly one of backend",
        ),
        (
            {"preference": {"judge": {**judge()["judge"], "constitution": "c.yaml", "calibration": "missing.json"}}},
            "online-dpo.preference.judge.calibration",
            "not found",
        ),
        (
            {
                "preference": {
                    "judge": {
                        "jury": {"a": {"backend": judge()["judge"]["backend"]}},
                        "constitution": "c.yaml",
                        "calibration": "c.yaml",
                    }
                }
            },
            "online-dpo.preference.judge.calibration",
            "fitted to one judge",
        ),
        ({"preference": {"model": "rm"}, "rollout": "vllm", "top": {"lora": {"r": 4}}}, "online-dpo.rollout", "lora"),
        ({"samples": 2}, "online-dpo", "'preference' is required"),
        (None, "online-dpo", "needs an online-dpo section"),
        ({"preference": {"model": "rm"}, "top": {"grad_accum": 2}}, "grad_accum", "batch_size"),
    ],
)
def test_a_bad_config_exits_2_naming_the_field(tmp_path, monkeypatch, capsys, section, field, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    (tmp_path / "c.yaml").write_text(CONSTITUTION.read_text())
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}])
    top = dict(section.pop("top", {})) if section else {}
    doc = {
        "model": "smollm2",
        "data": {"train": "prompts.jsonl"},
        "output_dir": "out",
        **top,
        **({"online-dpo": section} if section is not None else {}),
    }
    write_config(tmp_path / "train.yaml", **doc)
    assert main(["train", "online-dpo", "train.yaml"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.yaml: {field}: ") and says in err, err
    assert not (tmp_path / "out").exists()


def test_the_example_config_validates(tiny_model):
    cfg = train_config.load("online-dpo", ROOT / "train" / "online_dpo_demo.yaml", [f"model={tiny_model}"])
    options = cfg.online_dpo
    assert (options.samples, options.pairs, options.loss_type, options.beta, cfg.lr) == (
        2,
        "best_vs_worst",
        "sigmoid",
        0.1,
        1e-6,
    )
    assert options.preference.judge is not None and cfg.judges()[0][0] == "online-dpo.preference.judge"


@pytest.mark.parametrize("what", ["calibration", "jury", "vllm_options"])
def test_the_service_confines_the_judge_and_the_engine(tmp_path, monkeypatch, what):
    """A service job's online-dpo config: its calibration file stays in the workspace, each juror's API
    backend must be one the operator declared, the rollout engine's options pass the allow-list."""
    from cai.core.errors import InputError
    from cai.service.workspace import Workspace

    root = tmp_path / "ws"
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Hi?"}])
    (root / "c.yaml").write_text(CONSTITUTION.read_text())
    outside = tmp_path / "calibration.json"
    outside.write_text('{"temperature": 1.0, "position_offset": 0.0}')
    local = {"type": "vllm", "model": "smollm2"}
    section = {
        "calibration": {
            "preference": {"judge": {"backend": local, "constitution": "c.yaml", "calibration": str(outside)}}
        },
        "jury": {
            "preference": {
                "judge": {"jury": {"big": {"backend": judge()["judge"]["backend"]}}, "constitution": "c.yaml"}
            }
        },
        "vllm_options": {
            "preference": {"judge": {"backend": local, "constitution": "c.yaml"}},
            "vllm_options": {"trust_remote_code": True},
        },
    }[what]
    write_config(
        root / "train.yaml",
        model="smollm2",
        data={"train": "prompts.jsonl"},
        output_dir="runs/x",
        **{"online-dpo": section},
    )
    monkeypatch.chdir(root)  # as `cai serve` runs: in its workspace
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training("online-dpo", "train.yaml", [])
    field = {
        "calibration": "online-dpo.preference.judge.calibration",
        "jury": "online-dpo.preference.judge.jury.big.backend",
        "vllm_options": "online-dpo.vllm_options.trust_remote_code",
    }[what]
    assert info.value.render().startswith(f"train.yaml: {field}: "), info.value.render()
