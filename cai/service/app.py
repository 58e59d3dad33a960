"""The HTTP API and the dashboard (FastAPI; the OpenAPI page is at /docs). Bad input gets the CLI's
one-line message: 400 for files (an InputError), 422 for a malformed request body, 413 for one too
large, 429 when the queue is full. Three token scopes (cai/service/tokens.py): the submit token may do
everything, the read token only GET (dashboard, job list, progress, logs, downloads, label figures), a
labeler's token only label (cai/service/label_api.py); /api/access tells the dashboard which it holds."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from cai.core.errors import InputError, field_path
from cai.generate.pipeline import default_run_dir
from cai.rating import run as eval_run
from cai.service import progress as job_progress
from cai.service.body_limit import BodyLimit
from cai.service.browse_api import router as browse_router
from cai.service.jobs import DEFAULT_MAX_QUEUED, ENDED, Job, JobStore, NewJob, QueueFull
from cai.service.label_api import router as label_router
from cai.service.labeling import LabelStore
from cai.service.policy import job_keys
from cai.service.tokens import READ, Tokens, allowed
from cai.service.worker import Worker, redact, secrets
from cai.service.workspace import Workspace
from cai.train.config import KINDS

TOKEN_COOKIE = "cai_token"
STREAM_INTERVAL_S = 0.5
QUEUE_RETRY_S = 30  # Retry-After of a 429: about when a queued job may have started


@dataclass(frozen=True)
class ServiceConfig:
    workspace: Workspace
    token: str | None = None  # None: no authentication (loopback only; cai serve enforces that)
    read_token: str | None = None  # reads only; needs `token`
    label_tokens: Mapping[str, str] = field(default_factory=dict)  # labeler name -> token; needs `token`
    max_jobs: int = 1
    max_queued: int = DEFAULT_MAX_QUEUED


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an `api_key` field, say, is refused rather than ignored
    pipeline: str = Field(description="pipeline file, relative to the workspace")
    set: list[str] = Field(default_factory=list, description="overrides as `cai run --set`: KEY.PATH=VALUE")
    limit: int | None = Field(default=None, ge=1, description="use only the first N prompts")
    run_dir: str | None = Field(
        default=None, description="run directory relative to the workspace (default: as `cai run`)"
    )


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval: str = Field(description="eval file, relative to the workspace")
    set: list[str] = Field(default_factory=list, description="overrides as `cai eval --set`: KEY.PATH=VALUE")
    limit: int | None = Field(default=None, ge=1, description="use only the first N prompts of each axis")
    run_dir: str | None = Field(
        default=None, description="run directory relative to the workspace (default: as `cai eval`)"
    )


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal[KINDS]
    config: str = Field(description="train config file, relative to the workspace")
    set: list[str] = Field(default_factory=list, description="overrides as `cai train --set`: KEY.PATH=VALUE")


def create_app(config: ServiceConfig) -> FastAPI:
    ws = config.workspace
    store = JobStore(ws.state_dir / "jobs.sqlite", config.max_queued)

    def admit(job: Job) -> list[str]:
        ws.resolve(job.out_dir, "run_dir")
        if job.kind == "run":
            return job_keys(ws.load_pipeline(job.target, job.overrides).backends.values())
        if job.kind == "eval":
            return job_keys(ws.load_eval(job.target, job.overrides).used_backends())
        ws.load_training(job.kind, job.target, job.overrides)
        return []

    worker = Worker(store, ws.root, ws.state_dir, config.max_jobs, admit)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="cai service", summary="Pipeline runs, evals and trainings of a cai workspace", lifespan=lifespan
    )
    app.add_middleware(BodyLimit)

    # -- authentication

    tokens = Tokens(config.token, config.read_token, config.label_tokens)

    def presented(request: Request) -> str:
        header = request.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else None
        return bearer or request.cookies.get(TOKEN_COOKIE) or ""

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.token is None:
            request.state.principal = tokens.identify("")
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None and request.method == "GET" and tokens.identify(given) is not None:
            # The dashboard's first visit: keep the token in a cookie and drop it from the address bar,
            # so it stays out of the history and of links people copy.
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return response
        principal = tokens.identify(presented(request))
        if principal is None:
            return JSONResponse(
                {
                    "detail": "missing or wrong token: send `Authorization: Bearer $CAI_SERVER_TOKEN` (dashboard: open /?token=...)"
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        refused = allowed(principal, request.method, request.scope["path"])
        if refused is not None:
            return JSONResponse({"detail": refused}, status_code=403)
        request.state.principal = principal
        return await call_next(request)

    @app.get("/api/access", summary="What the token presented may do (the dashboard shows no controls it would refuse)")
    def access(request: Request) -> dict[str, Any]:
        principal = request.state.principal
        return {"read_only": principal.scope == READ, "scope": principal.scope, "name": principal.name}

    # -- errors: one line, as the CLI prints them

    @app.exception_handler(InputError)
    async def input_error(_request: Request, exc: InputError):
        return JSONResponse({"detail": exc.render()}, status_code=400)

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(QUEUE_RETRY_S)})

    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        return JSONResponse({"detail": f"request: {field_path(first['loc'])}: {first['msg']}"}, status_code=422)

    def get_job(job_id: int) -> Job:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def describe(job: Job, detail: bool = False) -> dict[str, Any]:
        out = {
            **job.to_json(),
            "command": ["cai", *job.command()],
            "progress": job_progress.progress(ws.state_dir, ws.root, job),
        }
        if detail:
            out["summary"] = job_progress.summary(ws.root, job)
            out["downloads"] = job_progress.downloads(ws.root, job)
            if job.kind == "eval":
                out["ratings"] = job_progress.ratings(ws.root, job)
        return out

    def queue(job: NewJob) -> dict[str, Any]:
        added = store.add(job)
        worker.wake()
        return describe(added)

    # -- jobs

    @app.get("/api/pipelines", summary="Pipeline files found in the workspace")
    def list_pipelines() -> list[dict[str, Any]]:
        return ws.pipelines()

    @app.get("/api/evals", summary="Eval files found in the workspace")
    def list_evals() -> list[dict[str, Any]]:
        return ws.evals()

    @app.get("/api/trainings", summary="Train configs found in the workspace, and the trainer kinds")
    def list_trainings() -> dict[str, Any]:
        return {"kinds": list(KINDS), "configs": ws.trainings()}

    @app.post("/api/jobs/run", status_code=201, summary="Queue a run of a workspace pipeline (as `cai run`)")
    def submit_run(body: RunRequest) -> dict[str, Any]:
        cfg = ws.load_pipeline(body.pipeline, body.set)
        run_dir = ws.run_dir(body.run_dir, default_run_dir(cfg), str(cfg.file))
        return queue(
            NewJob(
                kind="run",
                target=ws.relative(cfg.file),
                out_dir=ws.relative(run_dir),
                overrides=body.set,
                row_limit=body.limit,
                stages=[s.name for s in cfg.stages],
            )
        )

    @app.post("/api/jobs/eval", status_code=201, summary="Queue an eval of a workspace eval file (as `cai eval`)")
    def submit_eval(body: EvalRequest) -> dict[str, Any]:
        cfg = ws.load_eval(body.eval, body.set)
        run_dir = ws.run_dir(body.run_dir, eval_run.default_run_dir(cfg), str(cfg.file))
        return queue(
            NewJob(
                kind="eval",
                target=ws.relative(cfg.file),
                out_dir=ws.relative(run_dir),
                overrides=body.set,
                row_limit=body.limit,
                stages=[eval_run.ANSWERS, eval_run.JUDGMENTS],
            )
        )

    @app.post("/api/jobs/train", status_code=201, summary="Queue a training (as `cai train KIND CONFIG`)")
    def submit_training(body: TrainRequest) -> dict[str, Any]:
        cfg = ws.load_training(body.kind, body.config, body.set)
        return queue(
            NewJob(
                kind=body.kind,
                target=ws.relative(cfg.file),
                out_dir=ws.relative(ws.root / cfg.output_dir),
                overrides=body.set,
                max_steps=cfg.max_steps,
            )
        )

    @app.get("/api/jobs", summary="All jobs, oldest first, with their progress")
    def list_jobs() -> list[dict[str, Any]]:
        return [describe(job) for job in store.list()]

    @app.get(
        "/api/jobs/{job_id}", summary="One job: status, progress, summary of its outputs, downloads (an eval's ratings)"
    )
    def show_job(job_id: int) -> dict[str, Any]:
        return describe(get_job(job_id), detail=True)

    @app.post("/api/jobs/{job_id}/cancel", summary="Cancel a queued job, or stop a running one as Ctrl-C would")
    def cancel_job(job_id: int) -> dict[str, Any]:
        job = get_job(job_id)
        if not store.cancel(job_id):
            raise HTTPException(409, f"job {job_id} is {job.status}: only queued or running jobs can be cancelled")
        worker.wake()
        return describe(get_job(job_id))

    @app.post(
        "/api/jobs/{job_id}/resume", summary="Queue a cancelled, interrupted or failed job again; its run resumes"
    )
    def resume_job(job_id: int) -> dict[str, Any]:
        job = get_job(job_id)
        if not store.resume(job_id):
            raise HTTPException(
                409, f"job {job_id} is {job.status}: only cancelled, interrupted or failed jobs can be resumed"
            )
        worker.wake()
        return describe(get_job(job_id))

    @app.get(
        "/api/jobs/{job_id}/events", summary="Server-Sent Events: `progress` on each change, `end` when the job ends"
    )
    async def job_events(job_id: int) -> StreamingResponse:
        get_job(job_id)

        async def stream():
            last = None
            while True:
                job = await asyncio.to_thread(store.get, job_id)
                event = {
                    "id": job.id,
                    "status": job.status,
                    "error": job.error,
                    **job_progress.progress(ws.state_dir, ws.root, job),
                }
                if event != last:
                    yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                    last = event
                if job.status in ENDED:
                    yield f"event: end\ndata: {json.dumps(event)}\n\n"
                    return
                await asyncio.sleep(STREAM_INTERVAL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/jobs/{job_id}/log", response_class=PlainTextResponse, summary="The job's output (secrets scrubbed)")
    def job_log(job_id: int) -> str:
        path = job_progress.job_files(ws.state_dir, get_job(job_id))["log"]
        return redact(path.read_text(encoding="utf-8", errors="replace"), secrets()) if path.exists() else ""

    # -- downloads

    @app.get("/api/jobs/{job_id}/files/{path:path}", summary="A file of the job's run directory or training output")
    def job_file(job_id: int, path: str) -> FileResponse:
        job = get_job(job_id)
        out_dir = ws.resolve(job.out_dir, "run_dir")
        file = ws.resolve(f"{job.out_dir}/{path}", "path")
        if not file.is_relative_to(out_dir) or not file.is_file():
            raise HTTPException(404, f"no file {path} in {job.out_dir}")
        return FileResponse(file, filename=file.name, content_disposition_type="inline")

    @app.get("/api/jobs/{job_id}/datasets.zip", summary="The run's datasets folder as one zip file")
    def datasets_zip(job_id: int) -> FileResponse:
        job = get_job(job_id)
        datasets = ws.resolve(f"{job.out_dir}/datasets", "run_dir")
        if not datasets.is_dir():
            raise HTTPException(404, f"{job.out_dir} has no datasets yet")
        tmp = Path(tempfile.mkdtemp(prefix="cai-zip-"))
        archive = shutil.make_archive(str(tmp / "datasets"), "zip", root_dir=datasets.parent, base_dir="datasets")
        name = f"{Path(job.out_dir).name}-datasets.zip"
        return FileResponse(archive, filename=name, background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))

    app.include_router(label_router(ws, LabelStore(ws.state_dir / "jobs.sqlite")))
    app.include_router(browse_router(ws, get_job))

    # -- the dashboard

    static = Path(str(resources.files("cai.service").joinpath("static")))

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(static / "index.html")

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app
