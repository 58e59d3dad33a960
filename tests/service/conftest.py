"""One `cai serve` for the service tests (a vLLM engine start costs tens of seconds on a CPU, so the tests
share the server and one finished run that later jobs replay from its cache), and one for evals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_files import ROOT, tiny_pipeline

from service.fake_api import MODEL, FakeAPI
from service.labeling_files import LABEL_TOKENS, write_workspace
from service.serving import EVAL_KEY, EVAL_KEY_ENV, LIMIT, READ_TOKEN, Server


@pytest.fixture(scope="session")
def workspace(tiny_model, tmp_path_factory) -> Path:
    """The tiny pipeline with everything it names inside the workspace, by relative paths."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_model, ws / "models" / "tiny")
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", ws / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", ws / "prompts.jsonl")
    # "./": a folder, not a hub id. Answers of 32 tokens keep a job mid-run for some seconds, over several
    # of the progress stream's half-second intervals.
    tiny_pipeline(
        ws,
        "./models/tiny",
        rows_in_flight=2,
        constitution="constitution.yaml",
        prompts=["prompts.jsonl"],
        stages=[
            {"type": "respond", "max_tokens": 32, "temperature": 0.8},
            {"type": "critique_revise", "rounds": 1, "few_shot": 1, "max_tokens": 32, "temperature": 0.8},
        ],
    )
    return ws


@pytest.fixture(scope="session")
def server(workspace, tmp_path_factory):
    server = Server(workspace, tmp_path_factory.mktemp("serve-log") / "serve.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_job(server) -> tuple[dict, list[tuple[str, dict]]]:
    """A run of the tiny pipeline streamed to its end: (the finished job, its SSE events)."""
    job = server.submit(limit=LIMIT)
    events = server.events(job["id"])
    job = server.job(job["id"])
    assert job["status"] == "finished", server.client().get(f"/api/jobs/{job['id']}/log").text[-3000:]
    return job, events


# -- evals: rated on a fake API server the operator declares (no engine starts: the answers come back at
# once, and equal answers are ties without a judge's call)


@pytest.fixture(scope="session")
def eval_api():
    server = FakeAPI()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def eval_server(eval_api, tmp_path_factory):
    """A server with a read token and one declared API backend, over a workspace holding eval.yaml: two
    models (the same API model, sampled differently) rated on two axes, so the report draws the frontier."""
    ws = tmp_path_factory.mktemp("eval-workspace")
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", ws / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", ws / "red_team.jsonl")
    shutil.copy(ROOT / "prompts" / "helpful_demo.jsonl", ws / "helpful.jsonl")
    api = {"type": "openai", "model": MODEL, "base_url": eval_api.url, "api_key_env": EVAL_KEY_ENV, "max_retries": 0}
    doc = {
        "name": "tiny_eval",
        "seed": 5,
        "constitution": "constitution.yaml",
        "backends": {
            "api": api,
            # declared for the policy tests to use (a model on it is never started there)
            "local": {"type": "vllm", "model": "smollm2", "options": {"max_model_len": 1024}},
        },
        "models": {"base": {"backend": "api"}, "warm": {"backend": "api", "temperature": 1.0}},
        "baseline": "base",
        "judge": {"backend": "api"},
        "axes": {
            "harmless": {"prompts": "red_team.jsonl"},
            "helpful": {"prompts": "helpful.jsonl", "question": "Which response is more helpful?"},
        },
        "generation": {"max_tokens": 4},
        "bootstrap": 10,
    }
    (ws / "eval.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    operator = tmp_path_factory.mktemp("eval-operator")  # the server's own files: not in the workspace
    backends = operator / "backends.yaml"
    backends.write_text(
        yaml.safe_dump(
            {"backends": {"fake": {"type": "openai", "base_url": eval_api.url, "api_key_env": EVAL_KEY_ENV}}}
        )
    )
    server = Server(
        ws,
        operator / "serve.log",
        args=("--backends", str(backends)),
        env={EVAL_KEY_ENV: EVAL_KEY, "CAI_SERVER_READ_TOKEN": READ_TOKEN},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def finished_eval(eval_server) -> dict:
    """eval.yaml run to its end as a job, on the first prompt of each axis: the finished job's detail.
    One per test file: a later job on the same run directory (test_eval_jobs resubmits it) takes the
    ratings over, and the dashboard's leaderboards must not depend on which file ran first."""
    job = eval_server.submit_eval(limit=1)
    job = eval_server.wait_ended(job["id"], timeout=300)
    assert job["status"] == "finished", eval_server.client().get(f"/api/jobs/{job['id']}/log").text[-3000:]
    return job


# -- labeling: a server with labelers' tokens over hand-made pairs (no job runs there)


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("label-workspace")
    write_workspace(ws)
    server = Server(
        ws,
        tmp_path_factory.mktemp("label-log") / "serve.log",
        env={"CAI_SERVER_READ_TOKEN": READ_TOKEN, "CAI_SERVER_LABEL_TOKENS": LABEL_TOKENS},
    )
    server.start()
    yield server
    server.stop()
