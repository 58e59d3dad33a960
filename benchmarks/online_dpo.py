"""Online DPO: against offline DPO on the tests' synthetic task at the same number of judge calls, and
our online DPO step against TRL's experimental OnlineDPOTrainer (steps/s and peak memory, ours/TRL).

    .venv/bin/python benchmarks/online_dpo.py [--part both|synthetic|speed] [--synthetic-steps 12]
        [--steps 4] [--warmup 1] [--rounds 2] [--batch-size 8] [--max-new-tokens 32] [--beta 0.1] [--threads 1]

Synthetic part: the tiny random Llama of the tests (tests/tiny_model.py) on the red-team demo prompts,
half of them held out, answers of 6 tokens; the judge is the tests' scripted one (tests/train/
test_online_dpo.py: the compare stage's question answered by a rule, the answer with the larger share of
marker tokens wins, P(A) = sigmoid(8 (share_A - share_B)) + 0.05 towards (A)). Online DPO: 12 prompts a
step, K = 2, best against worst, hard labels, beta 0.1, lr 2e-2, `--synthetic-steps` steps. Offline DPO
with the same judge calls: the starting model answers the training prompts twice, as many times over as
the online run labelled pairs, the same judge labels those pairs once (both orders), and `cai train dpo`
trains on them with the same batch (12 pairs), steps, beta and lr. Printed per model (the starting one,
offline, online): the reward reached (the mean marker share of 4 answers per held-out prompt), the KL
to the starting model on those answers (sum over tokens of log pi - log pi_ref) and the win rate against
the starting model's answers, judged by the same judge.

Speed part (as benchmarks/grpo_vs_trl.py): the embedded SmolLM2-135M-Instruct in fp32 on both sides,
HF `generate` at temperature 1, top_k 0, top_p 1; each step `batch-size` prompts (default 8, TRL's
per_device_train_batch_size; the red-team prompts whose token lengths lie closest together) x K = 2
answers of at most `max-new-tokens` tokens; the labels
from the same reward model on both sides (SmolLM2 with a seeded random scalar head: what matters here is
its cost, a 135M forward pass per answer); beta 0.1, sigmoid loss, one update per generation, no
held-out win rate on our side (TRL measures none). Each run trains warm-up + steps steps in its own
process, sides alternated; the ratios are of medians (benchmarks/_common.py). HF generation is the
same work on both sides and is memory-bound at small batches: with 2 prompts it is about half of
either step and the ratio shrinks towards 1 (measured 1.15 there, 1.36 at 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import _common

HERE = Path(__file__).resolve()
ROOT = _common.ROOT
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "train")]


# ----------------------------------------------------------------------------- speed: ours against TRL


def run_ours(args, clock: _common.StepClock, folder: Path) -> None:
    from cai.train import online_dpo

    doc = {
        "model": "smollm2",
        "data": {"train": str(args.data), "eval_fraction": 0},
        "output_dir": str(folder / "out"),
        "seed": args.seed,
        "max_steps": args.warmup + args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 0,
        "scheduler": "cosine",
        "max_length": 512,
        "precision": "fp32",
        "save_every": 10**6,
        "online-dpo": {
            "preference": {"model": str(args.rm)},
            "samples": 2,
            "pairs": "best_vs_worst",
            "beta": args.beta,
            "loss_type": "sigmoid",
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "rollout": "hf",
        },
    }
    _common.time_ours(clock)
    online_dpo.train(_common.our_config("online-dpo", doc, folder))


def run_trl(args, clock: _common.StepClock, folder: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from cai.core import models
    from cai.train import runtime

    path = models.resolve("smollm2", [])
    tok = runtime.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32)
    rows = [{"prompt": json.loads(line)["messages"]} for line in args.data.read_text().splitlines()]
    config = OnlineDPOConfig(
        **_common.trl_common_args(args, folder / "out"),  # per_device_train_batch_size: prompts, 2 answers each
        max_new_tokens=args.max_new_tokens,
        max_length=512 + args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type="sigmoid",
        use_vllm=False,
    )
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=[rm],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        reward_processing_classes=[tok],
        callbacks=[_common.trl_callback(clock)],
    )
    trainer.train()


def reward_model(folder: Path) -> Path:
    """SmolLM2 with a scalar head (seeded): the same reward model for both sides."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai.core import models
    from cai.train import data, runtime

    path = models.resolve("smollm2", [])
    tok = runtime.load_tokenizer(path)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=data.pad_id(tok), dtype=torch.float32
    )
    rm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def speed(args) -> dict:
    from grpo_vs_trl import select_prompts

    prompts, shortest, longest = select_prompts(args.batch_size * (args.warmup + args.steps))
    print(
        f"SmolLM2 fp32, full fine-tune, HF generation, {args.batch_size} prompts ({shortest}-{longest} tokens) x K=2 answers "
        f"of <= {args.max_new_tokens} tokens a step, labels from one reward model (SmolLM2 + scalar head), beta {args.beta}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.threads} thread(s) per run",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "prompts.jsonl"
        data_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prompts), encoding="utf-8")
        rm = reward_model(Path(tmp) / "rm")
        argv = [a for a in sys.argv[1:]] + ["--rm", str(rm)]
        results = _common.run_sides(HERE, argv, data_file, args)
    return _common.report_ratios(results)


# ----------------------------------------------------------------------------- synthetic: online against offline


def synthetic(args) -> dict:
    import torch
    from conftest import corpus
    from synthetic import PROMPTS, read_metrics, write_config, write_jsonl
    from test_online_dpo import ScriptedJudge, judge
    from tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cai.generate.backends  # noqa: F401  (registers the backend types the scripted judge replaces)
    from cai.generate.backends.base import BACKENDS
    from cai.train import config as train_config
    from cai.train import dpo, online_dpo
    from cai.train.config import PairPreferenceSource

    torch.set_num_threads(args.threads)
    batch, lr, beta, steps = 12, 2e-2, 0.1, args.synthetic_steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_model(tmp / "tiny", corpus())
        tok = AutoTokenizer.from_pretrained(tiny)
        markers = [tok.decode([i]) for i in range(300, 600)]
        ScriptedJudge.tokenizer = tok
        ScriptedJudge.marker_ids = {
            tok.encode(t, add_special_tokens=False)[0]
            for t in markers
            if len(tok.encode(t, add_special_tokens=False)) == 1
        }
        BACKENDS._factories["openai"] = lambda spec: ScriptedJudge()
        common = {
            "model": str(tiny),
            "max_steps": steps,
            "batch_size": batch,
            "lr": lr,
            "max_length": 192,
            "save_every": 10**6,
            "seed": 1,
        }

        # --- online: the policy's own answers, labelled live
        online_cfg = train_config.load(
            "online-dpo",
            write_config(
                tmp / "online.yaml",
                **common,
                data={"train": str(PROMPTS), "eval_fraction": 0.5},
                output_dir=str(tmp / "online"),
                eval_every=steps,
                **{"online-dpo": {"preference": judge(), "samples": 2, "max_new_tokens": 6, "beta": beta}},
            ),
        )
        online_final = online_dpo.train(online_cfg)
        metrics = read_metrics(online_cfg.output_dir)
        online_calls = sum(m["judge_calls"] for m in metrics.values())

        # --- offline: the starting model's answers, labelled once, as many pairs as the online run labelled
        (train_prompts, train_ids), (held, held_ids) = online_dpo.prompt_splits(online_cfg, tok, _Acc())
        start = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
        labeller = online_dpo.PairLabeller(PairPreferenceSource(judge=online_cfg.online_dpo.preference.judge), "cpu", 1)
        records, offline_calls, r = [], 0, 0
        try:
            # rounds of two answers per training prompt, until the judge has made the online run's calls
            while (take := min(len(train_prompts), (online_calls - offline_calls) // 2)) > 0:
                answers = [texts(sample(start, tok, train_ids[:take], seed=1000 + 2 * r + s)) for s in range(2)]
                labels = labeller.start(train_prompts[:take], [list(pair) for pair in zip(*answers)], r)()
                offline_calls += labels.calls
                r += 1
                chosen, rejected, _ = online_dpo.choose_pairs(
                    labels.p, labels.judged, "all", False, labels.tie_threshold
                )
                for c, j in zip(chosen.tolist(), rejected.tolist()):
                    g = c // 2
                    records.append(
                        {
                            "prompt": train_prompts[g],
                            "chosen": [{"role": "assistant", "content": answers[c % 2][g]}],
                            "rejected": [{"role": "assistant", "content": answers[j % 2][g]}],
                            "group_id": f"{r}-{g}",
                        }
                    )
        finally:
            labeller.close()
        offline_cfg = train_config.load(
            "dpo",
            write_config(
                tmp / "offline.yaml",
                **common,
                data={"train": str(write_jsonl(tmp / "pairs.jsonl", records)), "eval_fraction": 0},
                output_dir=str(tmp / "offline"),
                dpo={"beta": beta, "loss_type": "sigmoid"},
            ),
        )
        offline_final = dpo.train(offline_cfg)

        # --- measured on the held-out prompts: reward reached, KL to the start, win rate against it
        labeller = online_dpo.PairLabeller(PairPreferenceSource(judge=online_cfg.online_dpo.preference.judge), "cpu", 1)
        results = {}
        try:
            reference_answers = [texts(sample(start, tok, held_ids, seed=500 + s)) for s in range(4)]
            for name, path in (("start", tiny), ("offline", offline_final), ("online", online_final)):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                sampled = [sample(model, tok, held_ids, seed=900 + s) for s in range(4)]
                answers = [texts(one) for one in sampled]
                flat = [a for batch_answers in answers for a in batch_answers]
                kl = statistics.mean(sequence_kl(model, start, held_ids, one) for one in sampled)
                wins = []
                for mine, theirs in zip(answers, reference_answers):
                    labels = labeller.start(held, [[a, b] for a, b in zip(mine, theirs)], 0, "win")()
                    wins += labels.p[:, 0, 1].tolist()
                results[name] = {
                    "reward": statistics.mean(ScriptedJudge.share(a) for a in flat),
                    "kl": kl,
                    "win_rate": statistics.mean(wins),
                }
        finally:
            labeller.close()
        results["judge_calls"] = {"online": online_calls, "offline": offline_calls}
        results["pairs_trained"] = {"online": sum(m["pairs"] for m in metrics.values()), "offline": len(records)}
    print(
        f"tiny Llama, {len(held)} held-out prompts x 4 answers; online and offline DPO: {steps} steps of {batch} pairs, "
        f"K=2, beta {beta}, lr {lr}; judge calls: online {results['judge_calls']['online']}, offline "
        f"{results['judge_calls']['offline']}; pairs trained: online {results['pairs_trained']['online']}, offline "
        f"{results['pairs_trained']['offline']}"
    )
    for name in ("start", "offline", "online"):
        r = results[name]
        print(
            f"{name:<8} reward {r['reward']:.3f}   KL to the start {r['kl']:.2f}   win rate vs start {r['win_rate']:.3f}"
        )
    return results


class _Acc:
    """What prompt_splits reads of an accelerator: where notes go."""

    is_main_process = True


def sample(model, tok, prompt_ids: list[list[int]], seed: int) -> list[tuple[str, list[int]]]:
    """One answer per prompt as the trainers sample (temperature 1, no top-k, 6 new tokens): its text and
    its tokens up to its end-of-sequence token."""
    import torch

    from cai.train import data
    from cai.train.rollout import response_mask

    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompt_ids}, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = model.generate(
            **batch,
            do_sample=True,
            top_k=0,
            max_new_tokens=6,
            pad_token_id=data.pad_id(tok),
            eos_token_id=tok.eos_token_id,
        )
    answers = ids[:, batch["input_ids"].shape[1] :]
    lengths = response_mask(answers, tok.eos_token_id).sum(1).long().tolist()
    return [(tok.decode(a[:n], skip_special_tokens=True), a[:n].tolist()) for a, n in zip(answers, lengths)]


def texts(sampled: list[tuple[str, list[int]]]) -> list[str]:
    return [text for text, _ in sampled]


def sequence_kl(model, reference, prompt_ids: list[list[int]], sampled: list[tuple[str, list[int]]]) -> float:
    """Mean over answers of sum_t log pi(y_t) - log pi_ref(y_t): the KL estimate on the model's own samples."""
    import torch

    from cai.train.losses import token_logps

    total = 0.0
    for prompt, (_, answer) in zip(prompt_ids, sampled):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = [
                token_logps(m(input_ids=ids).logits[:, len(prompt) - 1 :], ids[:, len(prompt) - 1 :])
                for m in (model, reference)
            ]
        total += (logp[0] - logp[1]).sum().item()
    return total / len(sampled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_side_arguments(parser, lr=1e-6)
    parser.add_argument("--part", choices=["both", "synthetic", "speed"], default="both")
    parser.add_argument("--synthetic-steps", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.set_defaults(batch_size=8)  # TRL's per_device_train_batch_size default
    parser.add_argument("--rm", type=Path, help=argparse.SUPPRESS)  # the speed part's reward model, for the sides
    args = parser.parse_args()

    if args.side is not None:
        _common.run_child(args, run_ours, run_trl)
        return
    if args.lora:
        sys.exit("--lora is not measured here")
    out = {}
    if args.part in ("both", "synthetic"):
        out["synthetic"] = synthetic(args)
    if args.part in ("both", "speed"):
        out["speed"] = speed(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
