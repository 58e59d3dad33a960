"""`cai train online-dpo`: online DPO from AI feedback (Guo et al. 2024, "Direct Language Model Alignment
from Online AI Feedback", OAIF). Offline RL-CAI labels the starting model's answers once, and the policy
then drifts away from the data it learns from; here every pair is the current policy's own.

Each step, for each of `batch_size` prompts: K = `samples` answers from the current policy (HF generation,
or the vLLM engine holding the policy's weights, replaced before every rollout as for PPO and GRPO). The
preference source labels pairs of them live, P(y_i beats y_j | x):
- the judge: the compare stage itself, as a pipeline labels pairs (every pair in both orders under
  `principles` comparison principles drawn per pair, the two orders averaged; each vote calibrated, or
  several backends voting by weight as a jury; a local engine or an API);
- a reward model: Bradley-Terry sigmoid(r(y_i) - r(y_j)).
The pairs trained are each prompt's best answer against its worst (`pairs: best_vs_worst`: the answers
with the highest and lowest mean P of beating the prompt's others; with K = 2 the one pair, as in the
paper), or every pair (`pairs: all`); each as (chosen, rejected) by the label, with the label's
probability as its target (`use_soft_labels`: conservative DPO, per pair) or as a hard verdict (pairs the
judge calls a tie are then left out). The loss is the DPO family's (losses.dpo_loss: `loss_type` sigmoid,
ipo or hinge, `beta`) against the frozen reference (the starting model; under LoRA the policy with its
adapter off), on the answers' sequence log-probs under the models themselves (temperature 1, as offline
DPO: the sampling temperature only shapes which answers are drawn).

The judge's calls go out as soon as a step's answers are sampled, all of them at once; while they are in
flight the trainer computes the reference's log-probs and the policy's forward pass (with gradients) over
all K answers, each prompt's answers packed in one row that holds the prompt once
(rollout.group_logps_and_entropy). Only the loss waits for the labels: that wait is `seconds_judge_wait`,
and `judge_wait_share` its share of the step.

`win_rate`: held-out prompts (`data.eval`, else a seeded `eval_fraction` of the prompt set) are answered
by the reference once at the start and by the policy as it starts each measured step (every step, or every
`eval_every` steps and the last); the same judge gives P(the policy's answer beats the reference's), and
the mean is the win rate (1/2 at the start, where the policy is the reference). Its judge calls go out
with the step's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cai.core.files import content_hash
from cai.generate import prompts as prompt_sets
from cai.train import checkpoint, data, loop, runtime
from cai.train.config import PairPreferenceSource, TrainConfig
from cai.train.losses import dpo_loss, masked_mean
from cai.train.reward import JudgeError, RewardScorer
from cai.train.rollout import Sampler, finish, fitting_prompts, group_logps_and_entropy, reference_logps, setup


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` returns right after step N's checkpoint."""
    from transformers import AutoModelForCausalLM

    options = config.online_dpo
    k = options.samples
    acc, tokenizer = setup(config, "raise batch_size instead (each step is one update on all its pairs)")

    # --- prompts (trained on and held out) and the labeller: validated before anything is written
    (conversations, encoded), (held_out, held_out_ids) = prompt_splits(config, tokenizer, acc)
    labeller = PairLabeller(options.preference, acc.device, config.seed, runtime.load_options(config))

    resume = runtime.prepare_output(config, acc)
    batches = runtime.batches(config, acc, [len(ids) for ids in encoded])
    steps = config.max_steps or config.epochs * batches.per_epoch

    # --- models: policy (trained), reference (frozen: the loss's, the KL's and the win rate's)
    policy, optimizer, scheduler = runtime.trainable(config, acc, resume, steps, AutoModelForCausalLM, "CAUSAL_LM")
    reference = runtime.load_reference(config, acc)
    sampler = Sampler(config, options, tokenizer, acc, "online-dpo-rollout")
    # held-out answers with HF generation: a few prompts, and the rollout engine keeps the step's weights
    held_out_sampler = Sampler(config, replace(options, rollout="hf"), tokenizer, acc, "online-dpo-eval")

    def as_reference():
        """The reference model, or under LoRA the policy with its adapter off."""
        return contextlib.nullcontext(reference) if reference is not None else _adapter_off(acc.unwrap_model(policy))

    state, metrics = loop.begin(config, acc, resume, steps)
    position = state["position"]
    # this process's share of the held-out prompts, answered once by the reference (seeded: a resumed run
    # gets the same answers)
    mine = held_out_ids[acc.process_index :: acc.num_processes]
    mine_prompts = held_out[acc.process_index :: acc.num_processes]
    opened = (metrics, sampler, labeller)
    try:
        with as_reference() as model:
            reference_answers = sample_texts(held_out_sampler, model, mine, "reference", config, k)

        for step in range(state["step"] + 1, steps + 1):
            indexes = batches(position)
            position += 1
            prompts = [conversations[i] for i in indexes]
            measure = bool(held_out) and (config.eval_every is None or step % config.eval_every == 0 or step == steps)
            step_started = time.perf_counter()

            # --- answers: the held-out ones first (when the win rate is due), so that the rollout, seeded per
            # step, leaves the same random state whether or not they ran
            started = time.perf_counter()
            held_out_answers = sample_texts(held_out_sampler, policy, mine, step, config, k) if measure else None
            eval_generation_seconds = time.perf_counter() - started
            rollout = sampler(policy, [encoded[i] for i in indexes for _ in range(k)], step)
            texts = sampler.texts(rollout)

            # --- labels: every judge call of the step goes out now
            labelling = labeller.start(prompts, [texts[g * k : (g + 1) * k] for g in range(len(prompts))], step)
            winning = (
                labeller.start(mine_prompts, [[a, b] for a, b in zip(held_out_answers, reference_answers)], step, "win")
                if measure and mine
                else None
            )

            # --- meanwhile: the reference's log-probs and the policy's forward pass over all K answers
            started = time.perf_counter()
            everyone = torch.arange(len(rollout.ids))
            ref_logp = reference_logps(reference, policy, acc, rollout, 1.0, k)
            reference_seconds = time.perf_counter() - started
            started = time.perf_counter()
            logp, entropy = group_logps_and_entropy(policy, rollout, everyone, k, 1.0)
            forward_seconds = time.perf_counter() - started

            # --- the labels (a failed judge call raises JudgeError here), the pairs, the DPO step
            labels = labelling()
            chosen, rejected, target = choose_pairs(
                labels.p, labels.judged, options.pairs, options.use_soft_labels, labels.tie_threshold
            )
            started = time.perf_counter()
            mask = rollout.mask
            lengths = mask.sum(1).clamp(min=1) if options.loss_type == "ipo" else None  # IPO: per-token means
            policy_seq, ref_seq = sequence_logps(logp, mask, lengths), sequence_logps(ref_logp, mask, lengths)
            if len(chosen):
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_seq[chosen],
                    policy_seq[rejected],
                    ref_seq[chosen],
                    ref_seq[rejected],
                    options.beta,
                    options.loss_type,
                    target.to(policy_seq.device) if options.use_soft_labels else None,
                )
                loss = losses.mean()
            else:  # no pair to learn from (every answer alike, or all ties): a step of zero gradients
                loss = (logp * 0).sum()
            runtime.check_finite(loss, "loss", step, config.output_dir)
            acc.backward(loss)
            grad_norm = runtime.apply_gradients(config, acc, policy.parameters(), optimizer, scheduler, step)
            training_seconds = time.perf_counter() - started
            win = winning() if winning is not None else None

            answer_tokens = mask.sum().item()
            token_kl = ((logp.detach() - ref_logp) * mask).sum(1)
            values = {
                "loss": loss.item(),
                "pairs": len(chosen),
                **labels.figures(),
                "kl": token_kl.mean().item(),
                "kl_per_token": token_kl.sum().item() / answer_tokens,
                "entropy": masked_mean(entropy, mask).item(),
                "grad_norm": grad_norm.item(),
                "response_length": answer_tokens / len(rollout.ids),
                "generation_tokens_per_s": answer_tokens / rollout.generation_seconds,
                "seconds_generation": rollout.generation_seconds,
                "seconds_weight_sync": rollout.sync_seconds,
                "seconds_reference": reference_seconds,
                "seconds_policy_forward": forward_seconds,
                labels.wait_key: labels.seconds,
                "seconds_training": training_seconds,
                "lr": scheduler.get_last_lr()[0],
            }
            if len(chosen):
                values.update(
                    reward_accuracy=(chosen_rewards > rejected_rewards).float().mean().item(),
                    reward_margin=(chosen_rewards - rejected_rewards).mean().item(),
                    chosen_reward=chosen_rewards.mean().item(),
                    rejected_reward=rejected_rewards.mean().item(),
                )
            if measure:
                # every process measured its share of the held-out prompts: the mean over all of them
                p = win.p[:, 0, 1] if win is not None else torch.zeros(0)
                total = acc.reduce(torch.tensor([p.sum().item(), len(p)], device=acc.device), "sum")
                values["win_rate"] = (total[0] / total[1]).item()
                values["seconds_eval_generation"] = eval_generation_seconds
                if win is not None:
                    values["seconds_win_rate_wait"] = win.seconds
            if labels.wait_key == "seconds_judge_wait":
                values["judge_wait_share"] = labels.seconds / (time.perf_counter() - step_started)
            metrics.log(step, "train", values)
            if step % config.save_every == 0 or step == steps:
                checkpoint.save(
                    acc, policy, tokenizer, config.output_dir, step, {"position": position}, config.keep_checkpoints
                )
            if step == stop_after:
                break
    except BaseException:  # a failed step (a judge call's reason) leaves no engine or connection open
        for thing in opened:
            thing.close()
        raise
    return finish(config, acc, policy, tokenizer, steps, stop_after, opened=opened)


@contextlib.contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield model


def prompt_splits(config: TrainConfig, tokenizer, acc) -> tuple[tuple[list, list], tuple[list, list]]:
    """(conversations, prompt ids) to train on, and held out for the win rate: `data.eval` from
    `eval_skip` on, else a seeded `eval_fraction` of the prompt set. Prompts with no room for
    max_new_tokens in max_length are left out (with a note)."""
    prompts = prompt_sets.load(config.train_data)[: config.limit]
    if config.eval_data is not None:
        held = prompt_sets.load(config.eval_data)[config.eval_skip :]
    else:
        prompts, held = data.split_eval(prompts, [p.id for p in prompts], config.eval_fraction, config.seed)
    out = []
    for what, chosen in (("prompt", prompts), ("held-out prompt", held)):
        conversations = [list(p.messages) for p in chosen]
        if not conversations:
            out.append(([], []))
            continue
        kept, encoded = fitting_prompts(config, tokenizer, conversations, config.online_dpo.max_new_tokens, acc, what)
        out.append(([conversations[i] for i in kept], [encoded[i] for i in kept]))
    return out[0], out[1]


def sample_texts(sampler: Sampler, model, prompts: list[list[int]], step, config: TrainConfig, k: int) -> list[str]:
    """One answer per prompt as text, in chunks of eval_batch_size (default batch_size * K), each chunk
    seeded by (step, chunk)."""
    size = config.eval_batch_size or config.batch_size * k
    texts = []
    for c in range(0, len(prompts), size):
        texts += sampler.texts(sampler(model, prompts[c : c + size], f"{step}.{c // size}"))
    return texts


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each answer's log-prob: the sum over its tokens, or with `lengths` their mean (IPO's form)."""
    total = (token_logps * mask).sum(1)
    return total if lengths is None else total / lengths


def choose_pairs(
    p: torch.Tensor, judged: torch.Tensor, how: str, soft: bool, tie_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs to train on from the labels of each prompt's K answers: (chosen, rejected) indexes into
    the flat [prompts * K] answers and each pair's target P(chosen beats rejected) >= 1/2.

    `p` [prompts, K, K] is P(answer i beats answer j), 1/2 where a pair was not judged (equal answers);
    `judged` [prompts, K, K] marks the judged pairs (i < j). `how`: `all` takes every judged pair;
    `best_vs_worst` the answer with the highest mean P of beating the prompt's others against the one
    with the lowest (the first on equal means), when that pair was judged. A pair is oriented by its
    label; with hard labels (`soft` False), pairs with |P - 1/2| < tie_threshold (or exactly 1/2) are
    left out: no verdict to learn."""
    groups, k = p.shape[0], p.shape[1]
    chosen, rejected, target = [], [], []
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    for g in range(groups):
        if how == "all":
            candidates = [(i, j) for i in range(k) for j in range(i + 1, k) if judged[g, i, j]]
        else:
            wins = (p[g] * off_diagonal).sum(1) / (k - 1)
            best, worst = int(wins.argmax()), int(wins.argmin())
            i, j = min(best, worst), max(best, worst)
            candidates = [(i, j)] if i != j and judged[g, i, j] else []
        for i, j in candidates:
            q = p[g, i, j].item()
            if q < 0.5:
                i, j, q = j, i, 1 - q
            if not soft and (q == 0.5 or q - 0.5 < tie_threshold):
                continue
            chosen.append(g * k + i)
            rejected.append(g * k + j)
            target.append(q)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long), torch.tensor(target)


@dataclass
class Labels:
    """The labels of each prompt's answers: P(answer i beats answer j) [prompts, K, K] (1/2 on the diagonal
    and for equal answers, which are not judged), which pairs were judged (i < j), each judged pair's
    position consistency (the judge; None where unknown), the judge calls made, and the seconds spent
    waiting for them (the judge) or computing them (a reward model)."""

    p: torch.Tensor
    judged: torch.Tensor
    consistent: list[bool]
    calls: int
    seconds: float
    tie_threshold: float
    wait_key: str  # the seconds' name in metrics.jsonl

    def figures(self) -> dict[str, float]:
        """Label confidence (mean |2P - 1| over the judged pairs), the share of ties among them, the
        judge's position consistency (both orders preferring the same answer) and its calls."""
        judged = self.p[self.judged]
        out = {"judged_pairs": len(judged)}
        if len(judged):
            out["label_confidence"] = (2 * judged - 1).abs().mean().item()
            out["label_ties"] = ((judged - 0.5).abs() < max(self.tie_threshold, 1e-12)).float().mean().item()
        if self.consistent:
            out["position_consistency"] = sum(self.consistent) / len(self.consistent)
        if self.calls:
            out["judge_calls"] = self.calls
        return out


class PairLabeller:
    """Labels every pair of each prompt's answers: the judge (the compare stage on its own event loop, so
    that its calls run while the trainer computes) or a reward model (Bradley-Terry, computed when the
    labels are collected). `start` sends the judge its calls and returns at once; calling what it returns
    collects the Labels."""

    def __init__(self, source: PairPreferenceSource, device, seed: int, load_options: dict | None = None):
        self.seed = seed
        self.scorer = (
            RewardScorer({"preference": (source.model, 1.0)}, device=str(device), load_options=load_options)
            if source.model is not None
            else None
        )
        self.loop = None
        if source.judge is None:
            return
        from cai.generate import calibration
        from cai.generate import constitution as constitution_mod
        from cai.generate.backends.base import LoopThread
        from cai.generate.stages.compare import Compare

        spec = source.judge
        self.stage = Compare(
            ensemble=spec.principles,
            swap=True,
            calibration=calibration.load(spec.calibration) if spec.calibration is not None else None,
            few_shot=spec.few_shot,
            method=spec.method,
            jury=spec.jury,
        )
        self.constitution = constitution_mod.load(spec.constitution)
        self.models = {role: backend.model for role, backend in spec.backends.items()}
        self.loop = LoopThread("cai-online-dpo-judge")
        self.backends: dict = {}
        try:
            self.loop.run(self._start(spec.backends))
        except BaseException:
            self.close()
            raise

    async def _start(self, specs) -> None:
        from cai.generate.backends.base import start

        for role, spec in specs.items():  # one at a time: a local engine takes the memory it finds
            self.backends[role] = await start(spec)

    def start(
        self, prompts: list[data.Messages], answers: list[list[str]], step: int, what: str = "pairs"
    ) -> Callable[[], Labels]:
        """Label every pair of each prompt's answers (`answers[g]`: prompt g's, K of them). `step` and
        `what` seed the judge's principle draws."""
        groups, k = len(answers), len(answers[0]) if answers else 0
        if self.loop is None:

            def bradley_terry() -> Labels:
                started = time.perf_counter()
                flat_prompts = [p for p, group in zip(prompts, answers) for _ in group]
                rewards = self.scorer.score(flat_prompts, [a for group in answers for a in group]).view(groups, k)
                p = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])
                judged = torch.zeros(groups, k, k, dtype=torch.bool)
                for g, group in enumerate(answers):  # equal answers are no pair, as for the judge
                    for i in range(k):
                        for j in range(i + 1, k):
                            judged[g, i, j] = group[i].strip() != group[j].strip()
                p = torch.where(judged | judged.transpose(1, 2), p, torch.full_like(p, 0.5))
                return Labels(p, judged, [], 0, time.perf_counter() - started, 0.0, "seconds_reward_model")

            return bradley_terry

        from cai.generate.stages.base import StageContext

        rows = [
            {"id": content_hash({"prompt": prompt, "step": step}), "messages": list(prompt), "responses": list(group)}
            for prompt, group in zip(prompts, answers)
        ]
        ctx = StageContext(self.seed, f"online-dpo-{what}", self.constitution, self.backends, self.models)
        future = asyncio.run_coroutine_threadsafe(self._judge(rows, ctx), self.loop.loop)

        def collect() -> Labels:
            started = time.perf_counter()
            judged_rows = future.result()  # a JudgeError from the loop is raised here
            seconds = time.perf_counter() - started
            p = torch.full((groups, k, k), 0.5)
            judged = torch.zeros(groups, k, k, dtype=torch.bool)
            consistent, calls = [], 0
            for g, pairs in enumerate(judged_rows):
                for pair in pairs:
                    i, j = pair["answers"]
                    if pair["p_first"] is None:
                        raise JudgeError(
                            "judge: no usable verdict (no log-probability on A or B, nor a parsed choice) between "
                            f"two answers to {prompts[g][-1]['content'][:80]!r}"
                        )
                    p[g, i, j], p[g, j, i] = pair["p_first"], 1 - pair["p_first"]
                    judged[g, i, j] = True
                    calls += len(pair["votes"])
                    if pair["position_consistent"] is not None:
                        consistent.append(pair["position_consistent"])
            return Labels(p, judged, consistent, calls, seconds, self.stage.tie_threshold, "seconds_judge_wait")

        return collect

    async def _judge(self, rows: list[dict], ctx) -> list[list[dict]]:
        from cai.generate.backends.base import BackendCallError
        from cai.generate.stages.base import RowFailed

        try:
            done = await asyncio.gather(*(self.stage.process(row, ctx) for row in rows))
        except (RowFailed, BackendCallError) as exc:
            raise JudgeError(str(exc)) from None
        return [processed.row["pairs"] for processed in done]

    def close(self) -> None:
        if self.loop is None:
            return
        try:
            for backend in self.backends.values():
                self.loop.run(backend.close())
        finally:
            self.loop.stop()
            self.loop = None
