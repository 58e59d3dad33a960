"""`cai train distill`: context distillation (Askell et al. 2021, "A General Language Assistant as a
Laboratory for Alignment"). The teacher (the starting model, or `distill.teacher`) answers each prompt
with a context before it: a system message listing a constitution's principles, or a system prompt the
user writes. The student (the starting model) learns to answer as the teacher does, without it:

- `target: logits` (the paper's): over the teacher's answers, the KL between the teacher's next-token
  distribution (with the context) and the student's (without) at every answer token
  (losses.distill_kl): forward KL(teacher || student) by default, or reverse, at `kl_temperature`.
- `target: text`: SFT on (the prompt without the context, the teacher's answer): the SFT trainer.

The teacher's answers are generated once (HF generate, or the vLLM engine), `samples` per prompt,
and kept: a rerun trains on them without generating again. Held-out prompts (`data.eval` or
`data.eval_fraction`) get teacher answers too; the KL to the teacher on them is what `distill.json`
reports for the starting and the final model.

OUTPUT/
  teacher/train.jsonl, eval.jsonl   the teacher's answers as SFT records (`messages` without the
                                    context), each with a HF datasets folder beside it
  checkpoints/, metrics.jsonl       (target logits) the KL per step, and on the held-out answers
  sft/                              (target text) the fine-tuning (checkpoints, metrics, final/)
  distill.json                      held-out KL to the teacher: the starting model's and the final one's
  final/
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.core.disk import read_jsonl, write_atomic
from cai.core.errors import InputError
from cai.core.files import read_text
from cai.core.seeding import derive_seed
from cai.generate import constitution as constitutions
from cai.generate import prompts as prompt_sets
from cai.train import data, loop, runtime
from cai.train.config import TrainConfig
from cai.train.losses import distill_kl
from cai.train.rejection import fine_tune, publish_final, sample, write_sft_records
from cai.train.rollout import Sampler, fitting_prompts


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train; returns OUTPUT/final. `stop_after=N` (target logits) returns right after step N's
    checkpoint, as a kill there would."""
    options = config.distill
    acc = runtime.accelerator(config)
    tokenizer = runtime.load_tokenizer(runtime.model_path(config))
    teacher_path = runtime.model_path(config, options.teacher)

    # --- context, prompts, teacher: validated before anything is written
    context = context_message(config)
    prompts = prompt_sets.load(config.train_data)[: config.limit]
    if config.eval_data is not None:
        eval_prompts = prompt_sets.load(config.eval_data)[config.eval_skip :]
    else:
        prompts, eval_prompts = data.split_eval(prompts, [p.id for p in prompts], config.eval_fraction, config.seed)
    if options.target == "logits" and runtime.load_tokenizer(teacher_path).get_vocab() != tokenizer.get_vocab():
        raise InputError(
            str(config.file),
            "distill.teacher",
            "target logits compares next-token distributions: the teacher needs the student's vocabulary",
        )
    resume = runtime.prepare_output(config, acc)

    # --- the teacher's answers, with the context; generated once
    files = teacher_answers(config, acc, context, {"train": prompts, "eval": eval_prompts}, teacher_path)
    pad_id = data.pad_id(tokenizer)
    eval_set = encode_answers(tokenizer, context, files["eval"], config.max_length)[0] if "eval" in files else []

    if options.target == "text":
        final = publish_final(
            fine_tune(config, Path(runtime.model_path(config)), files["train"], config.output_dir / "sft"),
            config.output_dir,
        )
    else:
        final = fit_logits(config, acc, tokenizer, context, files["train"], eval_set, resume, stop_after)
        if final is None:
            return config.output_dir / "final"
    write_summary(config, acc, eval_set, teacher_path, pad_id)
    return final


def fit_logits(
    config: TrainConfig,
    acc,
    tokenizer,
    context: dict[str, str],
    answers: Path,
    eval_set: list[Answer],
    resume: Path | None,
    stop_after: int | None,
) -> Path | None:
    """Target logits: the student trained on the KL to the teacher over the teacher's answers (loop.fit); returns OUTPUT/final, or None when stopped after step `stop_after`."""
    from transformers import AutoModelForCausalLM

    options = config.distill
    pad_id = data.pad_id(tokenizer)
    train_set, dropped = encode_answers(tokenizer, context, answers, config.max_length)
    if not train_set:
        raise InputError(
            str(config.file),
            "max_length",
            f"no teacher answer keeps a token within max_length {config.max_length} after its context",
        )
    if dropped:
        runtime.note(
            acc, f"left out {dropped} answers with no token within max_length {config.max_length} after the context"
        )
    training = loop.start(
        config,
        acc,
        tokenizer,
        resume,
        [len(a.student.input_ids) + len(a.teacher.input_ids) for a in train_set],
        AutoModelForCausalLM,
    )
    student = training.model
    # frozen; under LoRA with no teacher of its own, the student with its adapter off
    teacher = runtime.load_reference(config, acc, options.teacher)

    @contextlib.contextmanager
    def teacher_model():
        if teacher is not None:
            yield teacher
        else:
            with acc.unwrap_model(student).disable_adapter():
                yield student

    def batch_values(items: list[Answer]) -> tuple[torch.Tensor, dict[str, float]]:
        return answer_kl(student, teacher_model, items, pad_id, config)

    evaluate = loop.evaluator(
        training, len(eval_set), lambda indexes: batch_values([eval_set[i] for i in indexes])[1], weighted
    )
    if loop.fit(training, lambda indexes: batch_values([train_set[i] for i in indexes]), evaluate, stop_after) is None:
        return None
    final = loop.publish(config, acc, student, tokenizer)
    acc.free_memory()  # the summary loads its own models
    return final


# ----------------------------------------------------------------------------- the context


def context_message(config: TrainConfig) -> dict[str, str]:
    """The teacher's context as a system message."""
    context = config.distill.context
    if context.constitution is not None:
        text = system_prompt(constitutions.load(context.constitution))
    elif context.system_file is not None:
        text = read_text(context.system_file).strip()
        if not text:
            raise InputError(str(context.system_file), None, "the system prompt file is empty")
    else:
        text = context.system
    return {"role": "system", "content": text}


def system_prompt(constitution: constitutions.Constitution) -> str:
    """A constitution as a system prompt: its description, then each principle as the question its
    comparison asks (its critique request where it has none), the closest a principle comes to a
    statement of what a good answer is."""
    lines = [constitution.description.strip(), ""] if constitution.description else []
    lines.append("Give the answer that each of these questions would choose:")
    lines += [f"- {p.comparison or p.critique}" for p in constitution.principles]
    return "\n".join(lines)


def with_context(context: dict[str, str], messages) -> list[dict[str, str]]:
    """The teacher's conversation: the context as its system message, ahead of the prompt's own system
    message if it has one (a template may take only one, first)."""
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{context['content']}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [context, *messages]


# ----------------------------------------------------------------------------- the teacher's answers


def teacher_answers(
    config: TrainConfig, acc, context: dict[str, str], splits: dict[str, list], model: str
) -> dict[str, Path]:
    """The teacher's answers to each split's prompts as SFT records without the context,
    OUTPUT/teacher/SPLIT.jsonl; generated on the first run only (train.jsonl, written last, marks
    them complete)."""
    folder = config.output_dir / "teacher"
    files = {split: folder / f"{split}.jsonl" for split, prompts in splits.items() if prompts}
    if not files["train"].exists():
        asked = [(split, p) for split, prompts in splits.items() for p in prompts]
        answers = generate(config, acc, [with_context(context, p.messages) for _, p in asked], model)
        records: dict[str, list[dict]] = {split: [] for split in files}
        for index, texts in answers:
            split, p = asked[index]
            records[split] += [
                {"messages": [*p.messages, {"role": "assistant", "content": text}], "id": p.id, "sample": k}
                for k, text in enumerate(texts)
            ]
        if not records["train"]:
            raise InputError(
                str(config.file),
                "max_length",
                "no training prompt with its context fits in max_length with room for distill.max_new_tokens",
            )
        if acc.is_main_process:
            for split in sorted(files, key=lambda s: s == "train"):
                if records[split]:
                    write_sft_records(files[split], records[split])
        acc.wait_for_everyone()
    return {split: path for split, path in files.items() if path.exists()}


def generate(
    config: TrainConfig, acc, conversations: list[list[dict]], model: str
) -> list[tuple[int, tuple[str, ...]]]:
    """`distill.samples` answers from `model` to each conversation: (index, answers) of those that fit
    in max_length with room for `max_new_tokens`; HF generate in batches of `batch_size` prompts, or
    the vLLM engine (rejection.sample)."""
    from transformers import AutoModelForCausalLM

    options = config.distill
    if options.rollout == "vllm":
        return sample(
            config,
            options,
            conversations,
            [derive_seed(config.seed, "distill", i) for i in range(len(conversations))],
            Path(model),
        )
    tokenizer = runtime.load_tokenizer(model)
    tokenizer.padding_side = "left"  # prompts end where the answers start
    kept, encoded = fitting_prompts(
        config, tokenizer, conversations, options.max_new_tokens, acc, what="prompt with its context"
    )
    teacher = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **runtime.load_options(config))
    teacher = teacher.to(acc.device).eval()
    sampler = Sampler(config, options, tokenizer, acc, "distill-teacher")
    k, out = options.samples, []
    for batch, start in enumerate(range(0, len(kept), config.batch_size)):
        chunk = kept[start : start + config.batch_size]
        texts = sampler.texts(sampler(teacher, [encoded[i] for i in chunk for _ in range(k)], batch))
        out += [(i, tuple(texts[j * k : (j + 1) * k])) for j, i in enumerate(chunk)]
    return out


# ----------------------------------------------------------------------------- the KL on the answers


@dataclass(frozen=True)
class Answer:
    """A teacher answer as tokens twice: after its prompt (the student's input) and after the context
    and its prompt (the teacher's); the mask is 1 on the answer's tokens, the same tokens on both sides."""

    student: data.Encoded
    teacher: data.Encoded


def encode_answers(tokenizer, context: dict[str, str], path: Path, max_length: int) -> tuple[list[Answer], int]:
    """The SFT records of `path` as Answers, each answer's tokens up to its first end-of-sequence token
    (what the template puts after it, the teacher never generated) and cut to what fits in max_length
    on both sides; (answers, how many kept no token)."""
    out, dropped = [], 0
    for record in read_jsonl(path):
        messages = record["messages"]
        student = data.encode(tokenizer, messages, train_from=len(messages) - 1)
        teacher_messages = with_context(context, messages)
        teacher = data.encode(tokenizer, teacher_messages, train_from=len(teacher_messages) - 1)
        s, t, n = student.mask.index(1), teacher.mask.index(1), sum(student.mask)
        if sum(teacher.mask) != n or student.input_ids[s : s + n] != teacher.input_ids[t : t + n]:
            raise data.TemplateError("the chat template tokenises an answer differently after the context")
        answer = student.input_ids[s : s + n]
        if tokenizer.eos_token_id in answer:
            n = answer.index(tokenizer.eos_token_id) + 1
        keep = min(n, max_length - max(s, t))
        if keep < 1:
            dropped += 1
            continue
        out.append(
            Answer(
                data.Encoded(student.input_ids[: s + keep], student.mask[: s + keep]),
                data.Encoded(teacher.input_ids[: t + keep], teacher.mask[: t + keep]),
            )
        )
    return out, dropped


def answer_logits(model, items: list[data.Encoded], pad_id: int, device) -> torch.Tensor:
    """The logits that predict each item's answer tokens, [all answer tokens in order, vocab]. Only
    positions from the first that predicts an answer token go through the LM head."""
    batch = {k: v.to(device) for k, v in data.collate(items, pad_id).items()}
    starts = [e.mask.index(1) - 1 for e in items]  # logits at position i predict token i + 1
    first = min(starts)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=batch["input_ids"].shape[1] - first,
    ).logits
    rows = [r for r, e in enumerate(items) for _ in range(sum(e.mask))]
    cols = [start - first + j for start, e in zip(starts, items) for j in range(sum(e.mask))]
    return logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]


def answer_kl(
    student, teacher_model, items: list[Answer], pad_id: int, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation KL over the items' answer tokens (their mean) and its metrics; `teacher_model`
    is a context manager that gives the teacher."""
    device = next(student.parameters()).device
    student_logits = answer_logits(student, [a.student for a in items], pad_id, device)
    with torch.no_grad(), teacher_model() as teacher:
        teacher_logits = answer_logits(teacher, [a.teacher for a in items], pad_id, device)
    loss = distill_kl(
        student_logits, teacher_logits, temperature=config.distill.kl_temperature, direction=config.distill.kl
    )
    return loss, {"kl": loss.item(), "tokens": float(len(student_logits))}


def weighted(results: list[dict[str, float]]) -> dict[str, float]:
    """The KL over several batches, each batch's weighted by its tokens: the mean over all tokens."""
    tokens = sum(r["tokens"] for r in results)
    return {"kl": sum(r["kl"] * r["tokens"] for r in results) / tokens, "tokens": tokens}


@torch.no_grad()
def held_out_kl(student, teacher, items: list[Answer], pad_id: int, config: TrainConfig) -> float:
    size = config.eval_batch_size or config.batch_size
    return weighted(
        [
            answer_kl(student, lambda: contextlib.nullcontext(teacher), items[i : i + size], pad_id, config)[1]
            for i in range(0, len(items), size)
        ]
    )["kl"]


def write_summary(config: TrainConfig, acc, eval_set: list[Answer], teacher_path: str, pad_id: int) -> None:
    """OUTPUT/distill.json: the held-out KL to the teacher of the starting model and of the final one."""
    from transformers import AutoModelForCausalLM

    summary: dict = {
        "target": config.distill.target,
        "kl": config.distill.kl,
        "kl_temperature": config.distill.kl_temperature,
        "train_answers": sum(1 for _ in read_jsonl(config.output_dir / "teacher" / "train.jsonl")),
        "eval_answers": len(eval_set),
    }
    if eval_set:
        loaded = {"dtype": torch.float32, **runtime.load_options(config)}
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, **loaded).to(acc.device).eval()
        for name, path in (("start", runtime.model_path(config)), ("final", config.output_dir / "final")):
            model = AutoModelForCausalLM.from_pretrained(path, **loaded).to(acc.device).eval()
            summary[f"eval_kl_{name}"] = held_out_kl(model, teacher, eval_set, pad_id, config)
    if acc.is_main_process:
        write_atomic(config.output_dir / "distill.json", json.dumps(summary, indent=2) + "\n")
