"""The HTTP API against a real `cai serve` on 127.0.0.1 running real `cai run` jobs on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from cai.generate.store import read_shards
from service.serving import LIMIT, TOKEN


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
@pytest.mark.parametrize(
    "path",
    [
        "/api/jobs",
        "/api/pipelines",
        "/api/evals",
        "/api/access",
        "/",
        "/docs",
        "/openapi.json",
        "/api/jobs/1/files/report.html",
    ],
)
def test_requests_without_the_token_get_401(server, token, path):
    response = server.client(token).get(path)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]


def test_post_without_the_token_queues_nothing(server):
    before = len(server.client().get("/api/jobs").json())
    assert server.client(None).post("/api/jobs/run", json={"pipeline": "tiny.yaml"}).status_code == 401
    assert len(server.client().get("/api/jobs").json()) == before


def test_dashboard_token_link_sets_a_cookie(server):
    client = server.client(None)
    response = client.get("/?token=" + TOKEN, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert client.get("/api/jobs").status_code == 200  # the cookie from the link
    assert TOKEN not in server.log.read_text()  # the access log shows paths without query strings


@pytest.fixture(scope="module")
def outside(workspace, tmp_path_factory):
    """Files outside the workspace, and symlinks in it that lead there."""
    out = tmp_path_factory.mktemp("outside")
    (out / "pipeline.yaml").write_text((workspace / "tiny.yaml").read_text())
    (workspace / "link.yaml").symlink_to(out / "pipeline.yaml")
    (workspace / "linkdir").symlink_to(out)
    constitution = workspace / "constitution-outside.yaml"
    constitution.write_text(
        (workspace / "tiny.yaml").read_text().replace("constitution.yaml", str(workspace.parent / "c.yaml"))
    )
    (workspace.parent / "c.yaml").write_text((workspace / "constitution.yaml").read_text())
    return out


@pytest.mark.parametrize(
    "body",
    [
        {"pipeline": "../tiny.yaml"},
        {"pipeline": "sub/../../tiny.yaml"},
        {"pipeline": "/etc/passwd"},
        {"pipeline": "ABSOLUTE"},  # the workspace's own pipeline by an absolute path
        {"pipeline": "link.yaml"},
        {"pipeline": "linkdir/pipeline.yaml"},
        {"pipeline": "constitution-outside.yaml"},  # a pipeline inside that names a constitution outside
        {"pipeline": "tiny.yaml", "run_dir": "../elsewhere"},
        {"pipeline": "tiny.yaml", "run_dir": "linkdir/run"},
        {"pipeline": "tiny.yaml", "set": ["output.dir=/tmp/elsewhere"]},
    ],
    ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items() if k != "pipeline") or b["pipeline"],
)
def test_paths_that_escape_the_workspace_are_refused(server, workspace, outside, body):
    if body["pipeline"] == "ABSOLUTE":
        body = {"pipeline": str(workspace / "tiny.yaml")}
    before = len(server.client().get("/api/jobs").json())
    response = server.client().post("/api/jobs/run", json=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and ("refused" in detail or "leaves the workspace" in detail), detail
    assert len(server.client().get("/api/jobs").json()) == before


def test_training_config_outside_is_refused(server):
    response = server.client().post("/api/jobs/train", json={"kind": "sft", "config": "../train.yaml"})
    assert response.status_code == 400 and "refused" in response.json()["detail"]


def test_a_reward_model_outside_is_refused(server, workspace, outside):
    (outside / "rm").mkdir(exist_ok=True)
    config = {
        "model": "./models/tiny",
        "data": {"train": "prompts.jsonl"},
        "output_dir": "runs/ppo",
        "ppo": {"rewards": [{"name": "harmless", "model": str(outside / "rm")}]},
    }
    (workspace / "ppo_outside.yaml").write_text(json.dumps(config))
    response = server.client().post("/api/jobs/train", json={"kind": "ppo", "config": "ppo_outside.yaml"})
    assert response.status_code == 400 and response.json()["detail"].startswith(
        "ppo_outside.yaml: ppo.rewards[0].model: leaves the workspace"
    )


def test_bad_pipeline_gets_the_cli_message(server, workspace):
    response = server.client().post("/api/jobs/run", json={"pipeline": "tiny.yaml", "set": ["seed=x"]})
    cli = subprocess.run(
        [sys.executable, "-m", "cai.cli", "run", "tiny.yaml", "--set", "seed=x", "--run-dir", "never"],
        cwd=workspace,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and response.status_code == 400
    assert response.json()["detail"] == cli.stderr.strip() == "tiny.yaml: seed: expected integer, got string"


@pytest.mark.parametrize(
    "body, where",
    [({"limit": 0}, "body.limit"), ({"api_key": "sk-123456789"}, "body.api_key"), ({"set": "seed=1"}, "body.set")],
    ids=["limit-0", "api-key", "set-not-a-list"],
)
def test_malformed_requests_get_one_line_422(server, body, where):
    response = server.client().post("/api/jobs/run", json={"pipeline": "tiny.yaml", **body})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"request: {where}: ") and "\n" not in detail
    assert "sk-123456789" not in response.text


def test_pipelines_found_in_the_workspace(server):
    found = server.client().get("/api/pipelines").json()
    assert {"path": "tiny.yaml", "name": "tiny", "stages": ["respond", "critique_revise"]} in found
    assert all(not p["path"].startswith(("runs/", ".cai/")) for p in found)


def test_stream_reports_progress_until_the_job_ends(reference_job):
    job, events = reference_job
    names = [name for name, _ in events]
    assert names[-1] == "end" and names.count("end") == 1 and set(names[:-1]) == {"progress"}
    final = events[-1][1]
    assert final["status"] == "finished" and final["fraction"] == 1.0
    assert final["stages"]["critique_revise"]["done"] == final["stages"]["respond"]["done"] == LIMIT
    fractions = [data["fraction"] for _, data in events]
    assert fractions == sorted(fractions) and len(set(fractions)) > 2  # it moved, and only forward
    running = [data for _, data in events if data["status"] == "running" and data["rows_done"]]
    assert running and all(d["rows_per_s"] > 0 and d["tokens_per_s"] > 0 and d["failures"] == 0 for d in running)
    assert job["attempts"] == 1 and job["exit_code"] == 0


def test_train_configs_found_in_the_workspace(server, workspace):
    config = {"model": "./models/tiny", "data": {"train": "prompts.jsonl"}, "output_dir": "runs/sft"}
    (workspace / "sft_tiny.yaml").write_text(json.dumps(config))
    found = server.client().get("/api/trainings").json()
    assert {"path": "sft_tiny.yaml", "model": "./models/tiny", "output_dir": "runs/sft"} in found["configs"]
    assert {"sft", "rm", "dpo"} <= set(found["kinds"])
    assert all(c["path"] != "tiny.yaml" for c in found["configs"])  # a pipeline is not a train config


def test_a_runs_rows_filtered_a_page_at_a_time(server, workspace, reference_job):
    job, _ = reference_job
    client = server.client()
    page = client.get(f"/api/jobs/{job['id']}/rows", params={"limit": 5, "offset": 10}).json()
    assert page["total"] == LIMIT and len(page["rows"]) == LIMIT - 10
    every = [
        json.loads(line) for line in (workspace / job["out_dir"] / "datasets" / "rows.jsonl").read_text().splitlines()
    ]
    assert page["rows"] == every[10:]  # whole rows: answers, critiques, revisions
    principle = page["choices"]["principle"][0]
    picked = client.get(f"/api/jobs/{job['id']}/rows", params={"principle": principle}).json()
    assert picked["total"] == sum(principle in r["principle_ids"] for r in every)
    assert client.get(f"/api/jobs/{job['id']}/rows", params={"failed": True}).json()["total"] == 0
    assert client.get("/api/jobs/999999/rows").status_code == 404
    assert client.get(f"/api/jobs/{job['id']}/rows", params={"limit": 0}).status_code == 422
    side = client.get("/api/compare", params={"a": job["id"], "b": job["id"], "limit": 2}).json()
    assert side["shared"] == LIMIT and side["a"]["rows"] == LIMIT and len(side["rows"]) == 2


def test_job_summary_and_downloads(server, workspace, reference_job):
    job, _ = reference_job
    detail = server.job(job["id"])
    run_dir = workspace / job["out_dir"]
    assert detail["summary"]["datasets"] == {
        "rows": LIMIT,
        "sft": len((run_dir / "datasets" / "sft.jsonl").read_text().splitlines()),
    }
    assert {"report.html", "datasets/rows.jsonl", "datasets/sft.jsonl", "manifest.json"} <= set(detail["downloads"])
    client = server.client()
    for name in ("datasets/rows.jsonl", "datasets/sft.jsonl", "report.html"):
        response = client.get(f"/api/jobs/{job['id']}/files/{name}")
        assert response.status_code == 200 and response.content == (run_dir / name).read_bytes()
    png = next(p for p in detail["downloads"] if p.startswith("report/") and p.endswith(".png"))
    plot = client.get(f"/api/jobs/{job['id']}/files/{png}").content
    assert plot[:4] == b"\x89PNG"
    # the page holds its plots itself: it reads the same from the files URL, downloaded or mailed
    assert base64.b64encode(plot).decode("ascii") in client.get(f"/api/jobs/{job['id']}/files/report.html").text

    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/jobs/{job['id']}/datasets.zip").content))
    assert archive.read("datasets/rows.jsonl") == (run_dir / "datasets" / "rows.jsonl").read_bytes()
    assert "datasets/sft/dataset_info.json" in archive.namelist()

    missing = client.get(f"/api/jobs/{job['id']}/files/failures.jsonl")  # this run had none
    assert missing.status_code == 404
    escape = client.get(f"/api/jobs/{job['id']}/files/%2E%2E/%2E%2E/tiny.yaml")
    assert escape.status_code == 400 and "refused" in escape.json()["detail"]


def test_cli_submit_and_jobs(server, workspace, reference_job):
    env = {**os.environ, "CAI_SERVER_TOKEN": TOKEN}

    def cai(*args, env=env):
        return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True, env=env)

    submitted = cai("submit", "tiny.yaml", "--server", server.url, "--limit", str(LIMIT))
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.split()[0])
    assert server.wait_ended(job_id)["status"] == "finished"  # the finished run, replayed from its cache
    listed = cai("jobs", "--server", server.url)
    assert listed.returncode == 0
    assert any(line.split()[:3] == [str(job_id), "finished", "100.0%"] for line in listed.stdout.splitlines())

    bad = cai("submit", "../tiny.yaml", "--server", server.url)
    assert (
        bad.returncode == 2
        and bad.stderr.strip()
        == "cai submit: ../tiny.yaml: pipeline: '..' is refused: give a path inside the workspace"
    )
    no_token = cai("jobs", "--server", server.url, env={k: v for k, v in env.items() if k != "CAI_SERVER_TOKEN"})
    assert no_token.returncode == 1 and no_token.stderr.startswith("cai jobs: missing or wrong token")


def test_twenty_concurrent_submissions_all_run_once(server, workspace, reference_job):
    run_dir = workspace / reference_job[0]["out_dir"]
    invocations = len(json.loads((run_dir / "manifest.json").read_text())["invocations"])
    with ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(lambda _: server.submit(limit=LIMIT), range(20)))
    ids = [j["id"] for j in jobs]
    assert len(set(ids)) == 20 and all(j["status"] == "queued" for j in jobs)
    listed = {j["id"] for j in server.client().get("/api/jobs").json()}
    assert set(ids) <= listed

    ended = [server.wait_ended(i, timeout=900) for i in ids]
    assert [j["status"] for j in ended] == ["finished"] * 20
    assert [j["attempts"] for j in ended] == [1] * 20
    # each job started exactly one `cai run` on the run directory, one after another, and no row twice
    assert len(json.loads((run_dir / "manifest.json").read_text())["invocations"]) == invocations + 20
    with sqlite3.connect(workspace / ".cai" / "jobs.sqlite") as db:
        starts = dict(db.execute(f"SELECT id, attempts FROM jobs WHERE id IN ({','.join(map(str, ids))})").fetchall())
    assert starts == {i: 1 for i in ids}
    for stage in ("respond", "critique_revise"):
        counts = Counter(r["id"] for r in read_shards(run_dir / stage))
        assert len(counts) == LIMIT and set(counts.values()) == {1}
