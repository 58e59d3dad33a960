"""The labeling tests' workspace: a run's compared pairs with the judge's votes (hand-made, so the
agreement figures can be worked out by hand) and HH-style pairs, some holding hostile markup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from pipeline_files import ROOT

from cai.service import database
from cai.service.workspace import STATE_DIR

LABELERS = {name: f"label-{name}-0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}
LABEL_TOKENS = ",".join(f"{name}={token}" for name, token in LABELERS.items())

# Model text that must reach the page as text: were it parsed as HTML, each would set window.__xss.
HOSTILE = [
    "<script>window.__xss = 'script'</script>Plain words after a script tag.",
    "<img src=x onerror=\"window.__xss = 'img'\">An image that fails to load.",
    "<a href=\"javascript:window.__xss='link'\">click me</a> [also me](javascript:window.__xss='md')",
]


def judged_row(n: int, p1: tuple[float, float] | None, p2: tuple[float, float] | None, label: str) -> dict:
    """A run's row with one pair (its answer against its revision) and the judge's votes under two
    principles, each (shown first, shown second) as P(the answer is better)."""
    votes, probs = [], {}
    for name, ps in (("p1", p1), ("p2", p2)):
        if ps is not None:
            votes += [
                {"principle_id": name, "swapped": swapped, "p_first": p, "method": "logprobs"}
                for swapped, p in zip((False, True), ps)
            ]
            probs[name] = sum(ps) / 2
    p_first = sum(probs.values()) / len(probs) if probs else None
    return {
        "id": f"r{n}",
        "messages": [{"role": "user", "content": f"question {n}?"}],
        "response": f"r{n} first answer",
        "revision": f"r{n} revised answer",
        "pairs": [
            {
                "answers": [0, 1],
                "votes": votes,
                "principle_ids": list(probs),
                "principle_probs": probs,
                "p_first": p_first,
                "label": label,
                "position_consistent": True,
                "method": "logprobs",
            }
        ],
    }


# What the tests' two labelers answer on each run pair: `a` (the first answer), `b`, `tie`, or skip.
RUN_LABELS = {
    "r1": {"alice": "a", "bob": "a"},  # the judge agrees (0.8)
    "r2": {"alice": "a", "bob": "b"},  # no majority
    "r3": {"alice": "b", "bob": "b"},  # the judge called it a tie (0.55): people override it
    "r5": {"alice": "a", "bob": "tie"},  # no majority
    "r6": {"alice": "skip", "bob": "skip"},  # nobody labels it: the judge's label stays (0.7)
}


def write_eval_run(ws: Path) -> None:
    """An eval's run directory as `cai eval` leaves it (manifest, answers and judgments shards), written
    by hand: two models' answers to the first two prompts, one comparison the judge found invalid."""
    from cai.rating import config as eval_config

    shutil.copy(ROOT / "constitutions" / "harmless.yaml", ws / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", ws / "red_team.jsonl")
    local = {"type": "vllm", "model": "smollm2", "options": {"max_model_len": 1024}}  # never started
    doc = {
        "name": "label_eval",
        "constitution": "constitution.yaml",
        "backends": {"local": local},
        "models": {"base": {"backend": "local"}, "warm": {"backend": "local", "temperature": 1.0}},
        "baseline": "base",
        "judge": {"backend": "local"},
        "axes": {"harmless": {"prompts": "red_team.jsonl"}},
    }
    (ws / "eval.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    prompts = list(eval_config.load(ws / "eval.yaml", []).axes["harmless"].prompts(3))
    run = ws / "runs" / "eval"
    for folder in ("answers", "judgments"):
        (run / folder).mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"kind": "eval", "eval_file": str((ws / "eval.yaml").resolve())}))
    answers, judgments = [], []
    for n, prompt in enumerate(prompts):
        ids = [f"answer-{n}-{model}" for model in ("base", "warm")]
        answers += [{"id": i, "prompt_id": prompt.id, "answer": f"{i} text"} for i in ids]
        judge = judged_row(n, (0.3, 0.5), None, "b")["pairs"][0] if n < 2 else {"p_first": None, "label": "invalid"}
        judgments.append(
            {
                **judge,  # the judge's pair, its answers replaced by the answer ids an eval records
                "id": f"j{n}",
                "axis": "harmless",
                "prompt_id": prompt.id,
                "models": ["base", "warm"],
                "answers": ids,
            }
        )
    for folder, records in (("answers", answers), ("judgments", judgments)):
        (run / folder / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_workspace(ws: Path) -> None:
    rows = [
        judged_row(1, (0.9, 0.7), (0.8, 0.8), "a"),
        judged_row(2, (0.2, 0.4), (0.4, 0.4), "b"),
        judged_row(3, (0.6, 0.6), (0.5, 0.5), "tie"),
        judged_row(4, None, None, "invalid"),
        judged_row(5, (0.9, 0.9), (0.9, 0.9), "a"),
        judged_row(6, (0.7, 0.7), (0.7, 0.7), "a"),
    ]
    run = ws / "runs" / "judged" / "datasets"
    run.mkdir(parents=True)
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {
            "chosen": f"\n\nHuman: {text}\n\nAssistant: {text}",
            "rejected": f"\n\nHuman: {text}\n\nAssistant: A calm answer {i}.",
        }
        for i, text in enumerate(HOSTILE)
    ]
    pairs += [
        {
            "chosen": f"\n\nHuman: tell me {i}\n\nAssistant: yes {i}",
            "rejected": f"\n\nHuman: tell me {i}\n\nAssistant: no {i}",
        }
        for i in range(9)
    ]
    (ws / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    write_eval_run(ws)


def side(shown: dict, text: str) -> str:
    return "left" if shown["left"] == text else "right"


def label_run_pairs(server, task_id: int, labeler: str) -> list[dict]:
    """Label every pair the server hands `labeler` as RUN_LABELS says, choosing by the side each
    answer was shown on; returns what the server answered."""
    client, out = server.client(LABELERS[labeler]), []
    while True:
        response = client.post(f"/api/tasks/{task_id}/next")
        if response.status_code == 204:
            return out
        shown = response.json()
        row = shown["prompt"][0]["content"].split()[1].rstrip("?")
        wanted = RUN_LABELS[f"r{row}"][labeler]
        first = f"r{row} first answer"
        choice = {"a": side(shown, first), "b": "right" if side(shown, first) == "left" else "left"}.get(wanted, wanted)
        answered = client.post(
            f"/api/assignments/{shown['assignment']}", json={"choice": choice, "note": f"{labeler} on r{row}"}
        )
        assert answered.status_code == 200, answered.text
        out.append(answered.json())


def age_assignment(server, assignment_id: int, minutes: float) -> None:
    """Move an assignment's showing `minutes` into the past, as if the labeler had left it open that long."""
    with database.connect(server.workspace / STATE_DIR / "jobs.sqlite") as db:
        db.execute("UPDATE label_assignments SET shown = shown - ? WHERE id = ?", (minutes * 60, assignment_id))
