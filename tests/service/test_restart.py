"""Cancel a job, resume it, kill -9 the server while it runs, start the server again, resume again: the
dataset is byte for byte the one an uninterrupted run made, and no row was written twice."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

from cai.generate.store import read_shards
from service.serving import LIMIT


def stage_done(job: dict, stage: str) -> int:
    return job["progress"]["stages"].get(stage, {}).get("done", 0)


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (killed ones linger until reaped)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def wait_gone(pgid: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := live_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_cancel_kill_9_and_resume_give_the_uninterrupted_dataset(server, workspace, reference_job):
    client = server.client()
    job_id = server.submit(limit=LIMIT, run_dir="runs/interrupted")["id"]

    # Cancel as soon as it runs (before its engine starts: a second engine start per test is minutes on a
    # shared CPU; Ctrl-C in the middle of a stage is tests/generate/test_pipeline.py's resume test).
    server.wait(job_id, lambda j: j["status"] == "running")
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    job = server.wait_ended(job_id)
    assert job["status"] == "cancelled" and job["exit_code"] != 0
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409

    # Resume, and kill -9 the server while the job runs.
    assert client.post(f"/api/jobs/{job_id}/resume").json()["status"] == "queued"
    server.wait(
        job_id, lambda j: j["attempts"] == 2 and j["status"] == "running" and stage_done(j, "critique_revise") >= 2
    )
    with sqlite3.connect(workspace / ".cai" / "jobs.sqlite") as db:
        (pid,) = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
    server.kill9()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # it dies with the server
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")

    server.start()
    job = server.job(job_id)
    assert job["status"] == "interrupted" and "resume" in job["error"]
    assert not wait_gone(pid)  # nothing of the job's processes is left to write beside a resumed run
    assert client.post(f"/api/jobs/{job_id}/resume").status_code == 200
    job = server.wait_ended(job_id)
    assert job["status"] == "finished" and job["attempts"] == 3
    assert client.post(f"/api/jobs/{job_id}/resume").status_code == 409  # nothing left to resume

    reference, resumed = workspace / reference_job[0]["out_dir"], workspace / "runs" / "interrupted"
    for stage in ("respond", "critique_revise"):
        counts = Counter(r["id"] for r in read_shards(resumed / stage))
        assert len(counts) == LIMIT and set(counts.values()) == {1}
    for name in ("rows.jsonl", "sft.jsonl"):
        assert (resumed / "datasets" / name).read_bytes() == (reference / "datasets" / name).read_bytes()
