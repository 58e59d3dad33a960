"""The row browser's routes: a finished run job's rows (filtered, a page at a time), its failed rows,
and two run jobs side by side (cai/service/rows.py reads them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query

from cai.service import rows
from cai.service.jobs import Job
from cai.service.workspace import Workspace


def router(ws: Workspace, get_job: Callable[[int], Job]) -> APIRouter:
    api = APIRouter()

    def run_job(job_id: int) -> Job:
        job = get_job(job_id)
        if job.kind != "run":
            raise HTTPException(404, f"job {job_id} is {job.kind!r}, not a pipeline run: it has no rows")
        return job

    @api.get("/api/jobs/{job_id}/rows", summary="A run's rows, filtered, each whole; or its failed rows")
    def job_rows(
        job_id: int,
        q: str = "",
        flag: str = "",
        principle: str = "",
        label: str = "",
        failed: bool = False,
        stage: str = "",
        offset: int = Query(0, ge=0),
        limit: int = Query(rows.PAGE, ge=1, le=200),
    ) -> dict[str, Any]:
        job = run_job(job_id)
        run_dir = ws.resolve(job.out_dir, "run_dir")
        if failed:
            return rows.failed(run_dir, stage, q, offset, limit)
        return rows.browse(run_dir, job.out_dir, rows.RowFilter(q, flag, principle, label), offset, limit)

    @api.get("/api/compare", summary="Two run jobs side by side: counts, and the same prompts' rows")
    def compare(
        a: int,
        b: int,
        q: str = "",
        flag: str = "",
        principle: str = "",
        label: str = "",
        offset: int = Query(0, ge=0),
        limit: int = Query(rows.PAGE, ge=1, le=200),
    ) -> dict[str, Any]:
        first, second = run_job(a), run_job(b)
        return rows.side_by_side(
            ws.resolve(first.out_dir, "run_dir"),
            first.out_dir,
            ws.resolve(second.out_dir, "run_dir"),
            second.out_dir,
            rows.RowFilter(q, flag, principle, label),
            offset,
            limit,
        )

    return api
