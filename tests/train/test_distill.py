"""Context distillation on the tiny model made into a teacher whose answers change with a system prompt:
the student, trained without it, comes close to the teacher with it on held-out prompts (the KL to the
teacher falls) for both targets; a killed run resumes with the numbers of an uninterrupted one and
without generating again; the pieces that align the teacher's and the student's answer tokens."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from synthetic import PROMPTS, read_metrics, write_config, write_jsonl

from cai.cli import EXIT_BAD_INPUT, main
from cai.train import config as train_config
from cai.train import data, distill

SYSTEM = "Talk about locksmiths."
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model made to answer in whole words, to end its answers on its own, and to answer
    differently with SYSTEM before the prompt (a random model barely notices a context):

    - every input embedding gets one shared direction added, which then dominates the last hidden
      state, and the output rows of single-token words (" word", decoded and encoded back to itself)
      and of the end-of-turn token get it too: answers are such words (their text re-encodes to the
      sampled tokens) and most end before max_new_tokens (each is a whole turn);
    - the rows of 8 of those words get the direction in which SYSTEM moves the last hidden state
      (measured on a few prompts): with SYSTEM in context the teacher says them far more often.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    words = [
        i
        for i in range(len(tokenizer))
        if re.fullmatch(r" [A-Za-z]+", tokenizer.decode([i])) and tokenizer.encode(tokenizer.decode([i])) == [i]
    ]
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:16]]

    def last_hidden(system: bool) -> torch.Tensor:
        states = []
        for prompt in prompts:
            messages = [{"role": "system", "content": SYSTEM}] * system + [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            states.append(model(ids, output_hidden_states=True).hidden_states[-1][0, -1])
        return torch.stack(states).mean(0)

    with torch.no_grad():
        embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        scale = head.norm(dim=1).mean()
        embeddings += 1.5 * embeddings.norm(dim=1).mean() * direction
        head *= 4
        head[words] += 2.5 * scale * direction
        head[tokenizer.eos_token_id] += 6 * scale * direction
        shift = last_hidden(True) - last_hidden(False)
        head[words[:: len(words) // 8][:8]] += 20 * scale * shift / shift.norm()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def distill_config(tmp_path: Path, model: Path, name: str, target: str, **doc):
    base = {
        "model": str(model),
        "data": {"train": str(PROMPTS), "eval_fraction": 0.25},
        "output_dir": str(tmp_path / name),
        "max_steps": 16,
        "batch_size": 8,
        "lr": 1e-4,
        "max_length": 256,
        "save_every": 8,
        "seed": 1,
        "distill": {"context": {"system": SYSTEM}, "target": target, "samples": 4, "max_new_tokens": 24},
    }
    return write_config(tmp_path / f"{name}.yaml", **{**base, **doc})


@torch.no_grad()
def next_token_kl(student: Path, teacher: Path, prompts: list[str]) -> float:
    """Mean KL(teacher with SYSTEM || student without) of the first answer token's distribution,
    straight from the two models (none of the trainer's code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    models = {m: AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32) for m in (student, teacher)}
    kls = []
    for prompt in prompts:
        user = [{"role": "user", "content": prompt}]
        logps = []
        for model, messages in ((teacher, [{"role": "system", "content": SYSTEM}, *user]), (student, user)):
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            logps.append(models[model](ids).logits[0, -1].log_softmax(-1))
        kls.append((logps[0].exp() * (logps[0] - logps[1])).sum().item())
    return sum(kls) / len(kls)


@pytest.mark.parametrize("target, rollout", [("logits", "hf"), ("text", "hf"), ("text", "vllm")])
def test_the_student_comes_close_to_the_teacher_without_the_context(tmp_path, teacher_model, target, rollout):
    config = distill_config(tmp_path, teacher_model, "out", target)
    if rollout == "vllm":  # the teacher's answers from the engine
        doc = yaml.safe_load(config.read_text())
        doc["distill"].update(rollout="vllm", vllm_options={"kv_cache_memory_bytes": 256 << 20})
        config = write_config(config, **doc)
    assert main(["train", "distill", str(config)]) == 0
    out = tmp_path / "out"

    summary = json.loads((out / "distill.json").read_text())
    assert summary["eval_answers"] > 0 and summary["train_answers"] == 4 * 36  # 48 prompts, a quarter held out
    assert summary["eval_kl_start"] > 0.3  # the context changes the teacher's answers
    assert summary["eval_kl_final"] < 0.2 * summary["eval_kl_start"]

    held_out = [
        r["messages"][0]["content"]
        for r in map(json.loads, (out / "teacher" / "eval.jsonl").read_text().splitlines())
        if r["sample"] == 0
    ]
    before, after = (
        next_token_kl(teacher_model, teacher_model, held_out),
        next_token_kl(out / "final", teacher_model, held_out),
    )
    assert before > 0.3 and after < 0.3 * before

    answers = [json.loads(line) for line in (out / "teacher" / "train.jsonl").read_text().splitlines()]
    assert all(SYSTEM not in json.dumps(a["messages"]) and a["messages"][-1]["role"] == "assistant" for a in answers)
    if target == "logits":
        steps = read_metrics(out)
        assert sum(steps[s]["kl"] for s in (15, 16)) < 0.3 * sum(steps[s]["kl"] for s in (1, 2))
        assert read_metrics(out, "eval")[16]["kl"] == pytest.approx(summary["eval_kl_final"], rel=1e-4)
    else:
        assert (out / "sft" / "final" / "model.safetensors").exists()  # the SFT trainer's run


def test_resume_after_a_kill_gives_the_uninterrupted_run_without_generating_again(tmp_path, teacher_model):
    doc = {
        "data": {"train": str(PROMPTS), "eval_fraction": 0.25, "limit": 16},
        "max_steps": 6,
        "save_every": 2,
        "grad_accum": 2,
        "batch_size": 4,
    }
    straight = train_config.load("distill", distill_config(tmp_path, teacher_model, "straight", "logits", **doc))
    distill.train(straight)
    killed = train_config.load("distill", distill_config(tmp_path, teacher_model, "killed", "logits", **doc))
    distill.train(killed, stop_after=3)  # step 3 ran but was never saved
    assert sorted(p.name for p in (killed.output_dir / "checkpoints").iterdir()) == ["step-2"]
    generated = (killed.output_dir / "teacher" / "train.jsonl").stat().st_mtime_ns

    distill.train(killed)

    assert (killed.output_dir / "teacher" / "train.jsonl").stat().st_mtime_ns == generated
    for split in ("train", "eval"):  # seeded: the same answers as the uninterrupted run's
        assert (killed.output_dir / "teacher" / f"{split}.jsonl").read_text() == (
            straight.output_dir / "teacher" / f"{split}.jsonl"
        ).read_text()
    expected, resumed = read_metrics(straight.output_dir), read_metrics(killed.output_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step]["kl"] == pytest.approx(expected[step]["kl"], rel=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4), step
    assert json.loads((killed.output_dir / "distill.json").read_text()) == pytest.approx(
        json.loads((straight.output_dir / "distill.json").read_text())
    )


def test_answer_tokens_line_up_after_the_context_and_stop_at_the_end_of_turn(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (("Hi?", "Hello there."), ("Why is the sky blue?", "Light scatters."))
    ]
    context = {"role": "system", "content": SYSTEM}
    answers, dropped = distill.encode_answers(
        tokenizer, context, write_jsonl(tmp_path / "a.jsonl", records), max_length=256
    )
    assert dropped == 0
    for answer, record in zip(answers, records):
        student, teacher = ([i for i, m in zip(e.input_ids, e.mask) if m] for e in (answer.student, answer.teacher))
        assert (
            student == teacher == tokenizer.encode(record["messages"][-1]["content"]) + [tokenizer.eos_token_id]
        )  # not the "\n" after it
        assert len(answer.teacher.input_ids) - len(answer.student.input_ids) == len(
            tokenizer.apply_chat_template([context], tokenize=True, return_dict=False)
        )

    # cut to max_length on the teacher's side (the longer), the same tokens kept on the student's
    room = answers[0].teacher.mask.index(1) + 2
    cut, _ = distill.encode_answers(tokenizer, context, tmp_path / "a.jsonl", max_length=room)
    assert [sum(a.student.mask) for a in cut] == [sum(a.teacher.mask) for a in cut] and sum(cut[0].teacher.mask) == 2

    # padded together, each answer's logits are those of its sequence alone
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    items = [a.student for a in answers]
    with torch.no_grad():
        batched = distill.answer_logits(model, items, data.pad_id(tokenizer), "cpu")
        alone = []
        for e in items:
            logits = model(torch.tensor([e.input_ids])).logits[0]
            alone += [logits[i - 1] for i, m in enumerate(e.mask) if m]
    assert torch.allclose(batched, torch.stack(alone), atol=1e-5)


def test_a_constitution_becomes_a_system_prompt_of_its_principles(tmp_path):
    from cai.generate import constitution

    harmless = ROOT / "constitutions" / "harmless.yaml"
    path = write_config(
        tmp_path / "c.yaml",
        model="smollm2",
        data={"train": str(PROMPTS)},
        output_dir="x",
        distill={"context": {"constitution": str(harmless)}},
    )
    context = distill.context_message(train_config.load("distill", path))
    assert context["role"] == "system"
    principles = constitution.load(harmless).principles
    assert [line[2:] for line in context["content"].splitlines() if line.startswith("- ")] == [
        p.comparison or p.critique for p in principles
    ]
    # a prompt's own system message follows the context in the one system message a template may take
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert distill.with_context(context, own) == [
        {"role": "system", "content": context["content"] + "\n\nBe brief."},
        own[1],
    ]


def test_a_teacher_with_another_vocabulary_is_refused_for_target_logits(tmp_path, tiny_model, monkeypatch, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}])
    write_config(
        tmp_path / "train.yaml",
        model=str(tiny_model),
        data={"train": "prompts.jsonl"},
        output_dir="out",
        distill={"context": {"system": SYSTEM}, "teacher": "other"},
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "distill", "train.yaml"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(
        "train.yaml: distill.teacher: target logits compares next-token distributions"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "context, says",
    [
        ({"system_file": "system.txt"}, "system.txt: the system prompt file is empty"),
        ({"constitution": "c.yaml"}, "c.yaml: <root>: 'principles' is required"),
    ],
    ids=["empty-system-file", "not-a-constitution"],
)
def test_a_context_that_cannot_be_read_is_refused_before_anything_is_written(
    tmp_path, tiny_model, monkeypatch, capsys, context, says
):
    (tmp_path / "system.txt").write_text("  \n")
    (tmp_path / "c.yaml").write_text("name: mine\nversion: 1\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}])
    write_config(
        tmp_path / "train.yaml",
        model=str(tiny_model),
        data={"train": "prompts.jsonl"},
        output_dir="out",
        distill={"context": context},
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "distill", "train.yaml"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(says) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
