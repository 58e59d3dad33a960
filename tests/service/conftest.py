"""One `cai serve` for the service tests (a vLLM engine start costs tens of seconds on a CPU, so the tests
share the server and one finished run that later jobs replay from its cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pipeline_files import ROOT, tiny_pipeline

from service.serving import LIMIT, Server


@pytest.fixture(scope="session")
def workspace(tiny_model, tmp_path_factory) -> Path:
    """The tiny pipeline with everything it names inside the workspace, by relative paths."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_model, ws / "models" / "tiny")
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", ws / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", ws / "prompts.jsonl")
    # "./": a folder, not a hub id
    tiny_pipeline(
        ws, "./models/tiny", rows_in_flight=2, rounds=1, constitution="constitution.yaml", prompts=["prompts.jsonl"]
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
