"""A token holder tries the doors of `cai serve`: send a server secret elsewhere, load code through
engine options, make the server open a file outside its workspace, submit with a read-only token,
send a huge body, flood the queue. One server, its jobs talking to fake API servers on 127.0.0.1 (no
engine starts here: the pipelines' local backend is declared but never used)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from pipeline_files import ROOT

from service.fake_api import FakeAPI
from service.serving import READ_TOKEN, Server, fifo_has_reader

SECRET_ENV, SECRET = "CAI_TEST_CLOUD_SECRET", "cloud-secret-0123456789abcdef"  # unrelated to cai: must never leave
API_KEY_ENV, API_KEY = "CAI_TEST_API_KEY", "sk-declared-0123456789abcdef"  # the key of the operator's declared backend
MAX_QUEUED = 2
WAIT_S = 180  # for a job's process to start (Python imports on a busy CPU)


@pytest.fixture(scope="module")
def api():
    """The API server the operator declares."""
    server = FakeAPI()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def capture():
    """A token holder's own server: declared nowhere."""
    server = FakeAPI()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(api, tmp_path_factory):
    ws = tmp_path_factory.mktemp("guarded")
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", ws / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", ws / "prompts.jsonl")
    pipeline = {
        "name": "api",
        "seed": 3,
        "constitution": "constitution.yaml",
        "prompts": "prompts.jsonl",
        "backends": {
            "api": {
                "type": "openai",
                "model": "tiny",
                "base_url": api.url,
                "api_key_env": API_KEY_ENV,
                "max_concurrency": 2,
                "max_retries": 0,
            },
            # allowed options only; never started (no role uses it)
            "local": {
                "type": "vllm",
                "model": "smollm2",
                "options": {"max_model_len": 1024, "enforce_eager": True, "dtype": "float32"},
            },
        },
        "roles": {"responder": "api", "critic": "api", "reviser": "api"},
        "stages": [
            {"type": "respond", "max_tokens": 8},
            {"type": "critique_revise", "rounds": 1, "few_shot": 0, "max_tokens": 8},
        ],
        "rows_in_flight": 2,
    }
    (ws / "api.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    ppo = {
        "model": "smollm2",
        "data": {"train": "prompts.jsonl"},
        "output_dir": "runs/ppo",
        "ppo": {"rewards": [{"name": "short", "rule": "token_fraction", "tokens": ["."]}], "rollout": "vllm"},
    }
    (ws / "ppo.yaml").write_text(yaml.safe_dump(ppo))
    operator = tmp_path_factory.mktemp("operator")  # the server's own files: not in the workspace
    backends = operator / "backends.yaml"
    backends.write_text(
        yaml.safe_dump(
            {
                "backends": {
                    "fake": {"type": "openai", "base_url": api.url, "api_key_env": API_KEY_ENV, "models": ["tiny"]}
                }
            }
        )
    )
    server = Server(
        ws,
        operator / "serve.log",
        args=("--backends", str(backends), "--max-queued", str(MAX_QUEUED)),
        env={SECRET_ENV: SECRET, API_KEY_ENV: API_KEY, "CAI_SERVER_READ_TOKEN": READ_TOKEN},
    )
    server.start()
    yield server
    server.stop()


def one_line_400(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and all(w in detail for w in words), detail
    return detail


def job_pid(server: Server, job_id: int) -> int:
    with sqlite3.connect(server.workspace / ".cai" / "jobs.sqlite") as db:
        (pid,) = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return pid


# -- credentials go only where the operator said


@pytest.mark.parametrize(
    "sets",
    [
        [f"backends.api.api_key_env={SECRET_ENV}", "backends.api.base_url=CAPTURE"],  # the measured attack
        ["backends.api.base_url=CAPTURE"],  # the declared key, to another server
        [f"backends.api.api_key_env={SECRET_ENV}"],  # another key, to the declared server
        ["backends.api.base_url=['API', 'CAPTURE']"],  # one more URL beside the declared one
        [
            "backends.spy={type: openai, model: tiny, base_url: 'CAPTURE'}",
            "roles.critic=spy",
        ],  # no key, but a request to anywhere
        [
            f"backends.spy={{type: openai_batch, model: tiny, base_url: 'CAPTURE', api_key_env: {SECRET_ENV}}}",
            "roles.critic=spy",
        ],  # the same through a Batch API
    ],
    ids=[
        "secret-to-own-url",
        "declared-key-to-own-url",
        "secret-to-declared-url",
        "extra-url",
        "keyless-own-url",
        "batch-api-to-own-url",
    ],
)
def test_a_job_cannot_send_a_key_where_the_operator_did_not_allow(guarded, api, capture, sets):
    sets = [s.replace("CAPTURE", capture.url).replace("API", api.url) for s in sets]
    before = guarded.job_ids()
    response = guarded.client().post("/api/jobs/run", json={"pipeline": "api.yaml", "set": sets, "limit": 1})
    if response.status_code == 201:  # a door left open: let the job run, to show where the key goes
        guarded.wait_ended(response.json()["id"], timeout=WAIT_S)
    assert capture.requests == [], capture.requests
    one_line_400(response, "not a backend this server allows")
    assert guarded.job_ids() == before


def test_a_job_on_the_declared_backend_gets_its_key_and_no_other_secret(guarded, api):
    api.release.clear()  # hold the job at its first request, to look at its environment
    api.held.clear()
    try:
        job_id = guarded.submit("api.yaml", limit=2, run_dir="runs/declared")["id"]  # a new run: it calls the API
        assert api.held.wait(WAIT_S), guarded.client().get(f"/api/jobs/{job_id}/log").text
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{job_pid(guarded, job_id)}/environ").read_text().split("\0")
            if "=" in item
        )
    finally:
        api.release.set()
    job = guarded.wait_ended(job_id, timeout=WAIT_S)
    assert job["status"] == "finished", guarded.client().get(f"/api/jobs/{job_id}/log").text
    assert environ.get(API_KEY_ENV) == API_KEY
    assert not {SECRET_ENV, "CAI_SERVER_TOKEN", "CAI_SERVER_READ_TOKEN"} & set(environ)
    assert api.tokens() == {f"Bearer {API_KEY}"}


def test_a_job_is_checked_again_when_it_starts(guarded, api, capture):
    """What passed at submission may not pass later: the pipeline file changed while the job waited."""
    pipeline = guarded.workspace / "api.yaml"
    (guarded.workspace / "changing.yaml").write_text(pipeline.read_text())
    api.release.clear()  # one job holds the only slot, so the next one waits in the queue
    api.held.clear()
    try:
        first = guarded.submit("api.yaml", limit=1, run_dir="runs/first")["id"]
        assert api.held.wait(WAIT_S)
        waiting = guarded.submit("changing.yaml", limit=1, run_dir="runs/changing")["id"]
        (guarded.workspace / "changing.yaml").write_text(pipeline.read_text().replace(api.url, capture.url))
    finally:
        api.release.set()
    assert guarded.wait_ended(first, timeout=WAIT_S)["status"] == "finished"
    job = guarded.wait_ended(waiting, timeout=WAIT_S)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert (
        job["error"].startswith("changing.yaml: backends.api: ") and "not a backend this server allows" in job["error"]
    )
    assert capture.requests == []


# -- no code from a job


@pytest.mark.parametrize(
    "kind, target, sets, field",
    [
        (
            "run",
            "api.yaml",
            ["backends.local.options.trust_remote_code=true"],
            "backends.local.options.trust_remote_code",
        ),
        ("run", "api.yaml", ["backends.local.options.load_format=pt"], "backends.local.options.load_format"),
        ("run", "api.yaml", ["backends.local.options.worker_cls=evil.Worker"], "backends.local.options.worker_cls"),
        ("run", "api.yaml", ["backends.local.options.tokenizer=/etc"], "backends.local.options.tokenizer"),
        (
            "run",
            "api.yaml",
            ["backends.local.options.structured_outputs_config={reasoning_parser_plugin: /tmp/p.py}"],
            "reasoning_parser_plugin",
        ),
        ("run", "api.yaml", ["backends.local.model=someone/remote-code-model"], "backends.local.model"),
        ("ppo", "ppo.yaml", ["ppo.vllm_options.trust_remote_code=true"], "ppo.vllm_options.trust_remote_code"),
        ("ppo", "ppo.yaml", ["model=someone/remote-code-model"], "model"),
    ],
    ids=[
        "trust_remote_code",
        "pickle-load-format",
        "worker_cls",
        "tokenizer-path",
        "plugin-path",
        "hub-model",
        "ppo-trust_remote_code",
        "ppo-hub-model",
    ],
)
def test_engine_options_that_load_code_are_refused(guarded, kind, target, sets, field):
    before = guarded.job_ids()
    body = (
        {"pipeline": target, "set": sets, "limit": 1}
        if kind == "run"
        else {"kind": kind, "config": target, "set": sets}
    )
    response = guarded.client().post(f"/api/jobs/{'run' if kind == 'run' else 'train'}", json=body)
    one_line_400(response, field)
    assert guarded.job_ids() == before


# -- no file outside the workspace is opened


@pytest.mark.parametrize(
    "field, value",
    [("prompts", "FIFO"), ("constitution", "FIFO"), ("prompts", "linked.jsonl")],
    ids=["prompts", "constitution", "symlink-in-workspace"],
)
def test_files_outside_the_workspace_are_never_opened(guarded, tmp_path, field, value):
    # A FIFO blocks whoever opens it until a writer comes: the server would hang, and we would see the reader.
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    link = guarded.workspace / "linked.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(fifo)
    before = guarded.job_ids()
    try:
        response = guarded.client().post(
            "/api/jobs/run",
            json={"pipeline": "api.yaml", "set": [f"{field}={value.replace('FIFO', str(fifo))}"]},
            timeout=15,
        )
    finally:
        opened = fifo_has_reader(fifo)
        link.unlink()
    assert not opened
    one_line_400(response, f"api.yaml: {field}: leaves the workspace")
    assert guarded.job_ids() == before


# -- roles


def test_read_only_token_reads_but_cannot_submit_cancel_or_resume(guarded):
    job_id = guarded.submit("api.yaml", limit=1)["id"]
    reader = guarded.client(READ_TOKEN)
    for path in ("/api/jobs", "/api/pipelines", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/log", "/"):
        assert reader.get(path).status_code == 200, path
    before = guarded.job_ids()
    refused = [
        reader.post("/api/jobs/run", json={"pipeline": "api.yaml"}),
        reader.post("/api/jobs/train", json={"kind": "ppo", "config": "ppo.yaml"}),
        reader.post(f"/api/jobs/{job_id}/cancel"),
    ]
    guarded.wait_ended(job_id, timeout=WAIT_S)
    refused.append(reader.post(f"/api/jobs/{job_id}/resume"))
    for response in refused:
        assert response.status_code == 403, response.text
        assert "read-only" in response.json()["detail"] and "\n" not in response.json()["detail"]
    assert (
        guarded.job_ids() == before
        and guarded.job(job_id)["status"] == "finished"
        and guarded.job(job_id)["attempts"] == 1
    )

    # the dashboard's link with the read token: a cookie that reads, and still cannot submit
    browser = guarded.client(None)
    assert browser.get(f"/?token={READ_TOKEN}", follow_redirects=False).status_code == 303
    assert browser.get("/api/jobs").status_code == 200
    assert browser.post("/api/jobs/run", json={"pipeline": "api.yaml"}).status_code == 403
    assert guarded.job_ids() == before


# -- size and rate


def test_oversized_body_gets_413(guarded):
    before = guarded.job_ids()
    huge = {"pipeline": "api.yaml", "set": ["description=" + "x" * (1 << 20)], "limit": 1}
    response = guarded.client().post("/api/jobs/run", json=huge)
    assert response.status_code == 413 and "\n" not in response.json()["detail"], response.status_code

    def chunks():  # no Content-Length: the limit counts what arrives
        data = json.dumps(huge).encode()
        for i in range(0, len(data), 1 << 16):
            yield data[i : i + (1 << 16)]

    response = guarded.client().post("/api/jobs/run", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.status_code
    assert guarded.job_ids() == before


def test_a_burst_of_submissions_gets_429(guarded, api):
    client = guarded.client()
    api.release.clear()  # the one job that runs waits at its first request: the queue stays as the burst left it
    api.held.clear()
    accepted: list[int] = []
    try:
        accepted.append(guarded.submit("api.yaml", limit=1, run_dir="runs/held")["id"])  # a new run: it calls the API
        assert api.held.wait(WAIT_S)
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(lambda _: client.post("/api/jobs/run", json={"pipeline": "api.yaml", "limit": 1}), range(12))
            )
        accepted += [r.json()["id"] for r in responses if r.status_code == 201]
        assert Counter(r.status_code for r in responses) == {201: MAX_QUEUED, 429: 12 - MAX_QUEUED}
        flood = next(r for r in responses if r.status_code == 429)
        assert (
            "queued" in flood.json()["detail"]
            and "\n" not in flood.json()["detail"]
            and int(flood.headers["retry-after"]) > 0
        )

        # a resume is a submission too
        cancelled = accepted[-1]
        assert client.post(f"/api/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
        accepted.append(guarded.submit("api.yaml", limit=1)["id"])
        assert client.post(f"/api/jobs/{cancelled}/resume").status_code == 429
        assert guarded.job(cancelled)["status"] == "cancelled"
    finally:
        for job_id in accepted:
            client.post(f"/api/jobs/{job_id}/cancel")
        api.release.set()
    deadline = time.monotonic() + WAIT_S
    while any(guarded.job(i)["status"] in ("queued", "running") for i in accepted) and time.monotonic() < deadline:
        time.sleep(0.2)
