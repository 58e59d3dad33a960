"""Eval jobs (`cai eval` through the service) against a real `cai serve`: admitted as runs are (files
confined to the workspace, backends from the operator's list, engine options from the allow-list), run
to their ratings on a fake API server, cancelled and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service.fake_api import FakeAPI
from service.serving import EVAL_KEY, EVAL_KEY_ENV, READ_TOKEN, TOKEN, fifo_has_reader

WAIT_S = 180  # for a job's process to start (Python imports on a busy CPU)
SECRET_ENV = "CAI_TEST_EVAL_SECRET"  # a variable no declared backend uses


@pytest.fixture(scope="module")
def capture():
    """A token holder's own server: declared nowhere."""
    server = FakeAPI()
    yield server
    server.stop()


def refused(server, body: dict, status: int = 400) -> str:
    """The one-line detail of a submission refused with `status`, which queued nothing."""
    before = server.job_ids()
    response = server.client().post("/api/jobs/eval", json=body, timeout=15)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail
    assert server.job_ids() == before
    return detail


# -- a good eval


def test_a_finished_eval_job_has_its_ratings_and_files(eval_server, eval_api, finished_eval):
    job = eval_server.job(finished_eval["id"])
    run_dir = eval_server.workspace / "runs" / "tiny_eval"  # as `cai eval`: runs/NAME
    assert job["kind"] == "eval" and job["out_dir"] == "runs/tiny_eval"
    assert job["command"] == ["cai", "eval", "eval.yaml", "--run-dir", "runs/tiny_eval", "--quiet", "--limit", "1"]
    # a prompt per axis, answered by both models; a pair judged per axis
    stages = job["progress"]["stages"]
    assert {name: (s["done"], s["total"]) for name, s in stages.items()} == {"answers": (4, 4), "judgments": (2, 2)}
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["failures"] == 0
    assert job["summary"] == {"run_dir": "runs/tiny_eval", "failures": 0, "report": True}

    assert job["ratings"] == json.loads((run_dir / "ratings.json").read_text())
    assert list(job["ratings"]["axes"]) == ["harmless", "helpful"]
    assert set(job["ratings"]["axes"]["helpful"]["models"]) == {"base", "warm"}

    client = eval_server.client()
    for name in ("report.html", "ratings.json", "ratings.csv", "report/frontier.png"):
        assert name in job["downloads"]
        response = client.get(f"/api/jobs/{job['id']}/files/{name}")
        assert response.status_code == 200 and response.content == (run_dir / name).read_bytes()
    assert (run_dir / "report" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert eval_api.tokens() == {f"Bearer {EVAL_KEY}"}  # the declared backend's key, and to it alone


def test_an_eval_job_cancels_resumes_and_reruns(eval_server, eval_api):
    client = eval_server.client()
    eval_api.release.clear()  # hold the job at its first request: it is alive, with answers to make
    eval_api.held.clear()
    try:
        job_id = eval_server.submit_eval(limit=2, run_dir="runs/resumed")["id"]
        assert eval_api.held.wait(WAIT_S), client.get(f"/api/jobs/{job_id}/log").text
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    finally:
        eval_api.release.set()
    job = eval_server.wait_ended(job_id, timeout=WAIT_S)
    assert job["status"] == "cancelled" and job["ratings"] is None

    assert client.post(f"/api/jobs/{job_id}/resume").json()["status"] == "queued"
    job = eval_server.wait_ended(job_id, timeout=WAIT_S)
    assert job["status"] == "finished" and job["attempts"] == 2, client.get(f"/api/jobs/{job_id}/log").text
    assert job["ratings"]["axes"]["harmless"]["n_prompts"] == 2

    # The same eval again: it resumes the run directory, where nothing is left to do, and rates again.
    again = eval_server.wait_ended(eval_server.submit_eval(limit=2, run_dir="runs/resumed")["id"], timeout=WAIT_S)
    assert again["status"] == "finished" and again["ratings"] == job["ratings"]
    manifest = json.loads((eval_server.workspace / "runs" / "resumed" / "manifest.json").read_text())
    assert [(i["answers"]["new"], i["judgments"]["new"]) for i in manifest["invocations"] if "answers" in i] == [
        (8, 4),
        (0, 0),
    ]
    # the first job's ratings.json was replaced: that job shows none rather than the second one's
    assert eval_server.job(job_id)["ratings"] is None


def test_evals_found_in_the_workspace(eval_server):
    client = eval_server.client()
    found = client.get("/api/evals").json()
    assert {
        "path": "eval.yaml",
        "name": "tiny_eval",
        "models": ["base", "warm"],
        "axes": ["harmless", "helpful"],
    } in found
    assert all(not e["path"].startswith(("runs/", ".cai/")) for e in found)
    assert "eval.yaml" not in {p["path"] for p in client.get("/api/pipelines").json()}


# -- bad input


def test_a_bad_eval_gets_the_cli_message(eval_server):
    detail = refused(eval_server, {"eval": "eval.yaml", "set": ["seed=x"]})
    cli = subprocess.run(
        [sys.executable, "-m", "cai.cli", "eval", "eval.yaml", "--set", "seed=x", "--run-dir", "never"],
        cwd=eval_server.workspace,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and detail == cli.stderr.strip() == "eval.yaml: seed: expected integer, got string"


@pytest.mark.parametrize(
    "body, where",
    [({"limit": 0}, "body.limit"), ({"api_key": "sk-123456789"}, "body.api_key"), ({"set": "seed=1"}, "body.set")],
    ids=["limit-0", "api-key", "set-not-a-list"],
)
def test_malformed_requests_get_one_line_422(eval_server, body, where):
    assert refused(eval_server, {"eval": "eval.yaml", **body}, 422).startswith(f"request: {where}: ")


@pytest.mark.parametrize(
    "sets, field",
    [
        (["constitution=FIFO"], "constitution"),
        (["axes.harmless.prompts=FIFO"], "axes.harmless.prompts"),
        (["axes.helpful.prompts=['helpful.jsonl', 'FIFO']"], "axes.helpful.prompts[1]"),
        (["judge.calibration=FIFO"], "judge.calibration"),
        (["axes.harmless.prompts=linked.jsonl"], "axes.harmless.prompts"),  # a symlink in the workspace
    ],
    ids=["constitution", "prompts", "prompts-list", "calibration", "symlink-in-workspace"],
)
def test_files_outside_the_workspace_are_never_opened(eval_server, tmp_path, sets, field):
    # A FIFO blocks whoever opens it until a writer comes: the server would hang, and we would see the reader.
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    link = eval_server.workspace / "linked.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(fifo)
    try:
        detail = refused(eval_server, {"eval": "eval.yaml", "set": [s.replace("FIFO", str(fifo)) for s in sets]})
    finally:
        opened = fifo_has_reader(fifo)
        link.unlink()
    assert not opened
    assert detail.startswith(f"eval.yaml: {field}: leaves the workspace"), detail


@pytest.mark.parametrize(
    "body, start",
    [
        ({"eval": "../eval.yaml"}, "../eval.yaml: eval: '..' is refused"),
        ({"eval": "/etc/passwd"}, "/etc/passwd: eval: absolute paths are refused"),
        ({"eval": "eval.yaml", "run_dir": "../elsewhere"}, "../elsewhere: run_dir: '..' is refused"),
        ({"eval": "eval.yaml", "set": ["output.dir=/tmp/elsewhere"]}, "eval.yaml: output.dir: leaves the workspace"),
        (
            {"eval": "eval.yaml", "set": ["models.warm={backend: local, model: OUTSIDE}"]},
            "eval.yaml: models.warm.model: leaves the workspace",
        ),
        (
            {"eval": "eval.yaml", "set": ["models.warm={backend: local, checkpoints: 'OUTSIDE/step-*'}"]},
            "eval.yaml: models.warm.checkpoints: leaves the workspace",
        ),
    ],
    ids=["eval-dotdot", "eval-absolute", "run_dir", "output.dir", "model-folder", "checkpoints"],
)
def test_paths_that_escape_the_workspace_are_refused(eval_server, tmp_path, body, start):
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-1" / "config.json").write_text("{}")
    body = {**body, "set": [s.replace("OUTSIDE", str(tmp_path)) for s in body.get("set", [])]}
    detail = refused(eval_server, body)
    assert detail.startswith(start), detail


# -- backends


@pytest.mark.parametrize(
    "sets, field",
    [
        (["backends.api.base_url=CAPTURE"], "backends.api"),  # the declared key, to another server
        ([f"backends.api.api_key_env={SECRET_ENV}"], "backends.api"),  # another key, to the declared server
        (["backends.spy=SPY", "judge.backend=spy"], "backends.spy"),
        (["backends.spy=SPY", "judge={jury: {api: 1, spy: 1}}"], "backends.spy"),
        (["backends.spy=SPY", "models.warm.backend=spy"], "backends.spy"),
    ],
    ids=["declared-key-to-own-url", "other-key-to-declared-url", "judge", "juror", "rated-model"],
)
def test_an_eval_cannot_use_an_api_the_operator_did_not_declare(eval_server, capture, sets, field):
    spy = f"{{type: openai, model: tiny, base_url: '{capture.url}', api_key_env: {EVAL_KEY_ENV}}}"
    sets = [s.replace("CAPTURE", capture.url).replace("SPY", spy) for s in sets]
    detail = refused(eval_server, {"eval": "eval.yaml", "set": sets, "limit": 1})
    assert detail.startswith(f"eval.yaml: {field}: ") and "not a backend this server allows" in detail, detail
    assert capture.requests == []


@pytest.mark.parametrize(
    "sets, start",
    [
        (
            ["models.warm.backend=local", "backends.local.options.trust_remote_code=true"],
            "eval.yaml: backends.local.options.trust_remote_code: may only be false",
        ),
        (
            ["judge.backend=local", "backends.local.options.worker_cls=evil.Worker"],
            "eval.yaml: backends.local.options.worker_cls: not an engine option",
        ),
        (
            ["models.warm={backend: local, model: someone/remote-code-model}"],
            "eval.yaml: models.warm.model: someone/remote-code-model: not a model folder in the workspace",
        ),
        (
            ["backends.local.model=someone/remote-code-model", "judge.backend=local"],
            "eval.yaml: backends.local.model: ",
        ),
    ],
    ids=["trust_remote_code", "worker_cls", "hub-model", "hub-model-of-the-judge"],
)
def test_engine_options_and_models_that_load_code_are_refused(eval_server, sets, start):
    detail = refused(eval_server, {"eval": "eval.yaml", "set": sets})
    assert detail.startswith(start), detail


# -- roles


def test_a_read_only_token_sees_evals_and_cannot_start_one(eval_server):
    reader = eval_server.client(READ_TOKEN)
    assert reader.get("/api/access").json() == {"read_only": True, "scope": "read", "name": "reader"}
    assert eval_server.client().get("/api/access").json() == {"read_only": False, "scope": "submit", "name": "operator"}
    assert "eval.yaml" in {e["path"] for e in reader.get("/api/evals").json()}
    before = eval_server.job_ids()
    response = reader.post("/api/jobs/eval", json={"eval": "eval.yaml", "limit": 1})
    assert response.status_code == 403 and "read-only" in response.json()["detail"]
    assert eval_server.job_ids() == before


def test_cli_submits_an_eval(eval_server, finished_eval):
    env = {**os.environ, "CAI_SERVER_TOKEN": TOKEN}

    def submit(*args):
        command = [sys.executable, "-m", "cai.cli", "submit", *args, "--eval", "--server", eval_server.url]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    submitted = submit("eval.yaml", "--limit", "1")
    assert submitted.returncode == 0, submitted.stderr
    job = eval_server.wait_ended(int(submitted.stdout.split()[0]), timeout=WAIT_S)
    assert job["kind"] == "eval" and job["status"] == "finished"  # the finished eval, resumed with nothing new
    bad = submit("../eval.yaml")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "cai submit: ../eval.yaml: eval: '..' is refused: give a path inside the workspace"
