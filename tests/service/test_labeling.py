"""Labeling through the real server: a `label` token's doors, overlap-respecting assignment under
concurrent labelers, agreement figures against hand-worked values, and the exports read by
`cai eval-judge` and trained on by `cai train rm`."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
import yaml
from pipeline_files import ROOT

from cai.cli import main
from cai.generate.importers import load_pairs
from cai.service import database
from cai.service.labeling import HOLD_S, LabelStore
from service.fake_api import MODEL, FakeAPI
from service.labeling_files import LABELERS, RUN_LABELS, age_assignment, label_run_pairs
from service.serving import READ_TOKEN


def create(server, **body) -> dict:
    response = server.client().post("/api/tasks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_label_token_labels_and_nothing_else(label_server):
    task = create(label_server, name="scoped", source="pairs.jsonl", labelers=["alice"])
    alice, bob = label_server.client(LABELERS["alice"]), label_server.client(LABELERS["bob"])
    assert alice.get("/api/access").json() == {"read_only": False, "scope": "label", "name": "alice"}
    # its own flow
    shown = alice.post(f"/api/tasks/{task['id']}/next").json()
    assert set(shown) == {"assignment", "task", "prompt", "left", "right", "question"}  # never which is which
    assert [t["id"] for t in alice.get("/api/tasks").json()] == [task["id"]]
    assert "labels_by_labeler" not in alice.get("/api/tasks").json()[0]  # nor its colleagues' names
    # refused elsewhere: starting, cancelling, resuming, reading jobs, logs, files, figures, labels, exports
    refused = [
        ("POST", "/api/jobs/run", {"pipeline": "x.yaml"}),
        ("POST", "/api/jobs/train", {"kind": "sft", "config": "x.yaml"}),
        ("POST", "/api/jobs/1/cancel", None),
        ("POST", "/api/jobs/1/resume", None),
        ("GET", "/api/jobs", None),
        ("GET", "/api/jobs/1/log", None),
        ("GET", "/api/jobs/1/files/datasets/rows.jsonl", None),
        ("GET", "/api/jobs/1/datasets.zip", None),
        ("GET", "/api/pipelines", None),
        ("POST", "/api/tasks", {"name": "mine", "source": "pairs.jsonl"}),
        ("GET", f"/api/tasks/{task['id']}/agreement", None),
        ("GET", f"/api/tasks/{task['id']}/labels", None),
        ("POST", f"/api/tasks/{task['id']}/export", {"format": "hh", "path": "out.jsonl"}),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
    ]
    for method, path, body in refused:
        response = alice.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert "labels pairs only" in response.json()["detail"]
    # a task or an assignment that is not theirs
    assert bob.post(f"/api/tasks/{task['id']}/next").status_code == 403
    assert bob.post(f"/api/assignments/{shown['assignment']}", json={"choice": "left"}).status_code == 403
    assert bob.post("/api/assignments/999999", json={"choice": "left"}).status_code == 404
    assert alice.post(f"/api/assignments/{shown['assignment']}", json={"choice": "sideways"}).status_code == 422
    assert alice.post(f"/api/assignments/{shown['assignment']}", json={"choice": "left"}).status_code == 200
    assert alice.post(f"/api/assignments/{shown['assignment']}", json={"choice": "right"}).status_code == 409
    assert label_server.client("label-nobody-0123456789").post(f"/api/tasks/{task['id']}/next").status_code == 401
    # the read token sees the figures but labels nothing; a bad source is one line naming the field
    reader = label_server.client(READ_TOKEN)
    assert reader.get(f"/api/tasks/{task['id']}/agreement").status_code == 200
    assert reader.post(f"/api/tasks/{task['id']}/next").status_code == 403
    bad = label_server.client().post("/api/tasks", json={"name": "x", "source": "../outside.jsonl"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("../outside.jsonl: source: '..' is refused")
    (label_server.workspace / "bad.jsonl").write_text('{"chosen": "hi"}\n')
    bad = label_server.client().post("/api/tasks", json={"name": "x", "source": "bad.jsonl"})
    assert bad.status_code == 400
    assert bad.json()["detail"] == "bad.jsonl:1: expected an object with 'chosen' and 'rejected' transcripts"
    bad = label_server.client().post("/api/tasks", json={"name": "x", "source": "runs"})
    assert bad.status_code == 400 and "datasets/rows.jsonl" in bad.json()["detail"]


def test_concurrent_labelers_never_exceed_the_overlap(label_server):
    task = create(label_server, name="race", source="pairs.jsonl", overlap=2, seed=3)
    assert task["pairs"] == 12
    errors: list[str] = []
    start = threading.Barrier(len(LABELERS))

    def work(name: str) -> None:
        client = label_server.client(LABELERS[name])
        start.wait()
        while True:
            response = client.post(f"/api/tasks/{task['id']}/next")
            if response.status_code == 204:
                return
            shown = response.json()
            answered = client.post(f"/api/assignments/{shown['assignment']}", json={"choice": "tie"})
            if answered.status_code != 200:
                errors.append(answered.text)

    threads = [threading.Thread(target=work, args=(name,)) for name in LABELERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    labels = label_server.client().get(f"/api/tasks/{task['id']}/labels").json()
    per_pair = Counter(label["pair"] for label in labels)
    assert len(per_pair) == 12 and set(per_pair.values()) == {2}  # every pair, exactly the overlap
    assert len({(label["pair"], label["labeler"]) for label in labels}) == len(labels)  # never one labeler twice
    assert all(label["seconds"] >= 0 and label["answered"] for label in labels)
    listed = next(t for t in label_server.client().get("/api/tasks").json() if t["id"] == task["id"])
    assert listed["labels_done"] == listed["labels_target"] == 24


def test_a_pair_left_open_past_the_hold_goes_to_the_next_labeler(label_server):
    task = create(label_server, name="held", source="pairs.jsonl", limit=2, hold_minutes=30)
    assert task["hold_s"] == 30 * 60
    alice, bob, carol = (label_server.client(LABELERS[name]) for name in ("alice", "bob", "carol"))
    left_open = alice.post(f"/api/tasks/{task['id']}/next").json()  # alice looks at the first pair and leaves
    held = bob.post(f"/api/tasks/{task['id']}/next").json()
    assert held["assignment"] != left_open["assignment"] and held["left"] not in (left_open["left"], left_open["right"])
    assert bob.post(f"/api/assignments/{held['assignment']}", json={"choice": "left"}).status_code == 200
    assert carol.post(f"/api/tasks/{task['id']}/next").status_code == 204  # alice's pair is still hers
    assert alice.post(f"/api/tasks/{task['id']}/next").json() == left_open  # and comes back on her reload

    age_assignment(label_server, left_open["assignment"], 31)
    taken = carol.post(f"/api/tasks/{task['id']}/next")
    assert taken.status_code == 200, "the lapsed pair was not handed on"
    taken = taken.json()
    assert (taken["prompt"], {taken["left"], taken["right"]}) == (
        left_open["prompt"],
        {left_open["left"], left_open["right"]},
    )
    late = alice.post(f"/api/assignments/{left_open['assignment']}", json={"choice": "left"})
    assert late.status_code == 404 and "past its task's hold" in late.json()["detail"]
    assert alice.post(f"/api/tasks/{task['id']}/next").status_code == 204  # carol holds it now: the overlap is 1
    assert carol.post(f"/api/assignments/{taken['assignment']}", json={"choice": "tie"}).status_code == 200
    listed = next(t for t in label_server.client().get("/api/tasks").json() if t["id"] == task["id"])
    assert listed["labels_done"] == listed["labels_target"] == 2
    bad = label_server.client().post("/api/tasks", json={"name": "x", "source": "pairs.jsonl", "hold_minutes": 0})
    assert bad.status_code == 422


def test_a_server_file_from_before_holds_gets_the_default_hold(tmp_path):
    path = tmp_path / "jobs.sqlite"
    with database.connect(path) as db:
        db.execute(
            "CREATE TABLE label_tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, question TEXT NOT NULL, "
            "source TEXT NOT NULL, overlap INTEGER NOT NULL, seed INTEGER NOT NULL, labelers TEXT NOT NULL, "
            "left_out TEXT NOT NULL, created REAL NOT NULL)"
        )
        db.execute("INSERT INTO label_tasks VALUES (1, 'old', 'q?', 'pairs.jsonl', 1, 0, '[]', '{}', 0)")
    store = LabelStore(path)
    assert store.task(1)["hold_s"] == HOLD_S == 3600
    assert LabelStore(path).task(1)["name"] == "old"  # opening it again changes nothing


@pytest.fixture(scope="module")
def run_task(label_server) -> dict:
    """A task over the run's pairs, labelled by alice and bob as RUN_LABELS says, at the same time."""
    task = create(label_server, name="judged", source="runs/judged", overlap=2, seed=7, question="Which is kinder?")
    threads = [
        threading.Thread(target=label_run_pairs, args=(label_server, task["id"], who)) for who in ("alice", "bob")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return task


def test_agreement_figures_are_the_hand_worked_ones(label_server, run_task):
    assert run_task["pairs"] == 5 and run_task["left_out"] == {"invalid": 1}
    figures = label_server.client(READ_TOKEN).get(f"/api/tasks/{run_task['id']}/agreement").json()
    human = figures["human"]
    # r1 a/a, r2 a/b, r3 b/b, r5 a/tie (r6 skipped by both): agree on 2 of 4
    assert human["percent_agreement"] == pytest.approx(0.5)
    # alice a a b a, bob a b b tie: p_o = 1/2, p_e = (3*1 + 1*2) / 16 = 5/16, kappa = 3/11
    assert human["cohen"]["alice|bob"]["cohen_kappa"] == pytest.approx(3 / 11)
    # a 4/8, b 3/8, tie 1/8: P_e = 26/64, P = 1/2, kappa = 3/19
    assert human["fleiss_n"] == 4 and human["fleiss_kappa"] == pytest.approx(3 / 19)
    judge = figures["judge"]
    # measured on r1 (people a, judge 0.8: right) and r3 (people b, judge 0.55 for a: wrong)
    assert judge["n"] == 2 and judge["skipped"] == {"no_majority": 2}
    assert judge["overall"]["accuracy"] == pytest.approx(0.5)
    assert judge["by_principle"]["p1"]["accuracy"] == pytest.approx(0.5)  # r1 0.8 right, r3 0.6 wrong
    assert judge["by_principle"]["p2"]["accuracy"] == pytest.approx(0.75)  # r1 0.8 right, r3 exactly 0.5: half
    assert [d["first"] for d in judge["disagreements"]] == ["r3 first answer", "r1 first answer"]
    assert judge["disagreements"][0]["p_human"] == pytest.approx(0.45)
    assert sorted(judge["disagreements"][0]["notes"]) == ["alice on r3", "bob on r3"]
    labels = label_server.client().get(f"/api/tasks/{run_task['id']}/labels").json()
    assert {(label["labeler"], label["pair"]): label["label"] for label in labels} == {
        (who, f"{row}-0-1"): wanted for row, by in RUN_LABELS.items() for who, wanted in by.items()
    }  # skips listed too
    assert Counter(label["swapped"] for label in labels)[True] > 0  # orders shown vary, and are recorded


def test_a_task_from_an_evals_comparisons(label_server):
    task = create(label_server, name="eval", source="runs/eval", overlap=1)
    assert task["pairs"] == 2 and task["left_out"] == {"invalid": 1}
    shown = label_server.client(LABELERS["carol"]).post(f"/api/tasks/{task['id']}/next").json()
    assert {shown["left"], shown["right"]} <= {f"answer-{n}-{m} text" for n in (0, 1) for m in ("base", "warm")}
    assert shown["prompt"][0]["role"] == "user" and shown["prompt"][0]["content"]
    first = "answer-0-base text" if "answer-0-base text" in (shown["left"], shown["right"]) else "answer-1-base text"
    choice = "left" if shown["left"] == first else "right"  # the first model's answer: the judge said the second
    assert (
        label_server.client(LABELERS["carol"])
        .post(f"/api/assignments/{shown['assignment']}", json={"choice": choice})
        .status_code
        == 200
    )
    judge = label_server.client().get(f"/api/tasks/{task['id']}/agreement").json()["judge"]
    assert (
        judge["n"] == 1
        and judge["overall"]["accuracy"] == 0.0
        and judge["disagreements"][0]["p_human"] == pytest.approx(0.4)
    )


def test_exports_feed_eval_judge_and_train_rm(label_server, run_task, tiny_model, tmp_path, monkeypatch):
    client, ws = label_server.client(), label_server.workspace
    out = client.post(f"/api/tasks/{run_task['id']}/export", json={"format": "hh", "path": "labels/hh.jsonl"})
    assert out.status_code == 200, out.text
    assert out.json()["records"] == 2 and out.json()["counts"] == {"pairs": 2, "no_majority": 2, "unlabelled": 1}
    pairs = load_pairs(ws / "labels" / "hh.jsonl")  # what eval-judge reads
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("r1 first answer", "r1 revised answer"),
        ("r3 revised answer", "r3 first answer"),
    ] or [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("r3 revised answer", "r3 first answer"),
        ("r1 first answer", "r1 revised answer"),
    ]
    assert all(p["context"][0]["content"].startswith("question") for p in pairs)

    out = client.post(
        f"/api/tasks/{run_task['id']}/export", json={"format": "preferences", "path": "labels/mixed.jsonl"}
    )
    assert out.json()["counts"] == {"human": 2, "ai": 1, "no_majority": 2}
    mixed = {r["id"]: r for r in map(json.loads, (ws / "labels" / "mixed.jsonl").read_text().splitlines())}
    assert mixed["r3-0-1"]["label_source"] == "human"  # the judge's tie, overridden
    assert mixed["r3-0-1"]["chosen"][0]["content"] == "r3 revised answer" and mixed["r3-0-1"]["label_prob"] == 1.0
    assert mixed["r6-0-1"]["label_source"] == "ai" and mixed["r6-0-1"]["label_prob"] == pytest.approx(0.7)
    bad = client.post(f"/api/tasks/{run_task['id']}/export", json={"format": "hh", "path": "labels"})
    assert bad.status_code == 400 and bad.json()["detail"] == "labels: path: is a folder: name the JSONL file to write"

    # eval-judge reads the export, with a judge on a fake API that always answers A: in both orders, so
    # each pair's swap-averaged probability is 1/2 (half credit) and no pair is position-consistent
    api = FakeAPI(answer="A")
    try:
        monkeypatch.setenv("CAI_TEST_LABEL_KEY", "sk-label-0123456789")
        pipeline = tmp_path / "judge.yaml"
        backend = {
            "type": "openai",
            "model": MODEL,
            "base_url": api.url,
            "api_key_env": "CAI_TEST_LABEL_KEY",
            "max_retries": 0,
        }
        doc = {
            "name": "judge",
            "seed": 1,
            "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
            "prompts": str(ROOT / "prompts" / "red_team_demo.jsonl"),
            "backends": {"api": backend},
            "roles": {"responder": "api", "judge": "api"},
            "stages": [{"type": "respond"}, {"type": "compare", "method": "parsed"}],
        }
        pipeline.write_text(yaml.safe_dump(doc))
        report = tmp_path / "judge.json"
        args = ["eval-judge", str(ws / "labels" / "hh.jsonl"), "--pipeline", str(pipeline), "--json", str(report)]
        assert main([*args, "--log", str(tmp_path / "judge.log")]) == 0
    finally:
        api.stop()
    figures = json.loads(report.read_text())
    assert figures["n"] == 2 and figures["accuracy"] == 0.5 and figures["position_consistency"] == 0.0

    # cai train rm on the mixed dataset: the tiny model, two steps
    config = tmp_path / "rm.yaml"
    data = str(ws / "labels" / "mixed.jsonl")
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model),
                "data": {"train": data, "eval": data},
                "output_dir": str(tmp_path / "rm"),
                "max_steps": 2,
                "batch_size": 2,
                "max_length": 64,
            }
        )
    )
    assert main(["train", "rm", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics if m["split"] == "train") == 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("alice", "CAI_SERVER_LABEL_TOKENS: 'alice': expected NAME=TOKEN entries"),
        ("alice=short", "CAI_SERVER_LABEL_TOKENS: alice: the token is shorter than 16 characters"),
        ("alice=0123456789abcdef,alice=fedcba9876543210", "CAI_SERVER_LABEL_TOKENS: alice: a labeler named twice"),
        ("operator=0123456789abcdef", "CAI_SERVER_LABEL_TOKENS: operator: a labeler named twice, or named 'operator'"),
        ("bob=submit-token-0123456789", "CAI_SERVER_LABEL_TOKENS: bob: the token is another token of this server"),
    ],
)
def test_labelers_tokens_are_checked_before_the_server_starts(value, message):
    from cai.core.errors import InputError
    from cai.service.tokens import parse_label_tokens

    with pytest.raises(InputError) as info:
        parse_label_tokens(value, ("submit-token-0123456789", None))
    assert info.value.render().startswith(message)
    assert parse_label_tokens(" a=0123456789abcdef,\n b=fedcba9876543210 ", (None,)) == {
        "a": "0123456789abcdef",
        "b": "fedcba9876543210",
    }


def test_labelers_tokens_need_the_operators_token(tmp_path, monkeypatch):
    from cai.service.server import ServeOptions, UnsafeServe, serve

    monkeypatch.delenv("CAI_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("CAI_SERVER_LABEL_TOKENS", "alice=0123456789abcdef")
    with pytest.raises(UnsafeServe, match="set CAI_SERVER_TOKEN too"):
        serve(ServeOptions(tmp_path))
