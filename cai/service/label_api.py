"""The labeling routes of the API: tasks (the operator creates them; readers see their figures),
the labeler's flow (next pair, answer), agreement figures, and exports into the workspace. Who may
call which is the tokens' business (cai/service/tokens.py); here, which labeler is asking."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.judge import agreement
from cai.service import label_data
from cai.service.labeling import CHOICES, HOLD_S, Answered, LabelStore, NewTask, NotYours, may_label
from cai.service.tokens import LABEL, Principal
from cai.service.workspace import Workspace

DEFAULT_QUESTION = "Which response is more helpful, honest and harmless?"


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    source: str = Field(description="a run directory or an HH-style JSONL file, relative to the workspace")
    question: str = Field(default=DEFAULT_QUESTION, min_length=1, max_length=2000)
    overlap: int = Field(default=1, ge=1, le=20, description="labelers per pair")
    seed: int = 0
    limit: int | None = Field(default=None, ge=1, description="only the first N pairs of the source")
    labelers: list[str] = Field(default_factory=list, description="who may label it (empty: every labeler)")
    hold_minutes: float = Field(
        default=HOLD_S / 60,
        gt=0,
        le=7 * 24 * 60,
        description="how long a pair shown but not answered stays the labeler's",
    )


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: Literal[CHOICES] = Field(description="the answer shown left or right is better, a tie, or skip")
    note: str | None = Field(default=None, max_length=5000)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["hh", "preferences"] = Field(
        description="hh: chosen/rejected transcripts (eval-judge); preferences: human and AI labels mixed (train rm, dpo)"
    )
    path: str = Field(description="the JSONL file to write, relative to the workspace")


def router(ws: Workspace, store: LabelStore) -> APIRouter:
    api = APIRouter()

    def principal(request: Request) -> Principal:
        return request.state.principal

    def eval_prompts(eval_file: str) -> dict[str, list[dict[str, str]]]:
        """The prompts of an eval run's eval file, by id: the file loaded as a job's would be (in the workspace)."""
        cfg = ws.load_eval(ws.relative(ws.inside(Path(eval_file), eval_file, "eval")), [])
        return {p.id: [dict(m) for m in p.messages] for axis in cfg.axes.values() for p in axis.prompts()}

    def get_task(task_id: int) -> dict[str, Any]:
        task = store.task(task_id)
        if task is None:
            raise HTTPException(404, f"no labeling task {task_id}")
        return task

    @api.post("/api/tasks", status_code=201, summary="Create a labeling task from a run's pairs or an HH-style JSONL")
    def create_task(body: TaskRequest) -> dict[str, Any]:
        source = ws.resolve(body.source, "source")
        items, left_out = label_data.load_items(source, body.source, body.limit, eval_prompts)
        task = NewTask(
            body.name,
            body.question,
            ws.relative(source),
            body.overlap,
            body.seed,
            body.labelers,
            body.hold_minutes * 60,
        )
        return store.create(task, items, left_out)

    @api.get("/api/tasks", summary="Labeling tasks with their progress (a labeler: the ones it may label)")
    def list_tasks(request: Request) -> list[dict[str, Any]]:
        who = principal(request)
        return store.tasks(who.name if who.scope == LABEL else None)

    @api.post("/api/tasks/{task_id}/next", summary="The caller's next pair to label; 204 when none is left")
    def next_pair(task_id: int, request: Request) -> Any:
        who = principal(request)
        task = get_task(task_id)
        if not may_label(task, who.name):
            raise HTTPException(403, f"task {task_id} is not one of yours")
        shown = store.next(task, who.name)
        if shown is None:
            return Response(status_code=204)
        return {**shown, "question": task["question"]}

    @api.post("/api/assignments/{assignment_id}", summary="Answer an assignment: left, right, tie or skip")
    def answer(assignment_id: int, body: AnswerRequest, request: Request) -> dict[str, Any]:
        try:
            return store.answer(assignment_id, principal(request).name, body.choice, body.note)
        except KeyError:
            raise HTTPException(
                404, f"no assignment {assignment_id} (one left unanswered past its task's hold goes to others)"
            ) from None
        except NotYours as exc:
            raise HTTPException(403, str(exc)) from None
        except Answered as exc:
            raise HTTPException(409, str(exc)) from None

    @api.get("/api/tasks/{task_id}", summary="One task and its progress")
    def show_task(task_id: int) -> dict[str, Any]:
        return get_task(task_id)

    @api.get("/api/tasks/{task_id}/agreement", summary="Human-human and human-judge agreement, worst pairs first")
    def task_agreement(task_id: int) -> dict[str, Any]:
        task = get_task(task_id)
        items = store.items(task_id)
        labels = {item["id"]: {a["labeler"]: a["label"] for a in item["given"]} for item in items if item["given"]}
        judged = agreement.human_judge(
            [{**item, "answers": [item["first"], item["second"]]} for item in items if item["labels"]]
        )
        by_id = {item["id"]: item for item in items}
        for worst in judged["disagreements"]:  # what a person reads to see why
            item = by_id[worst["id"]]
            worst.update(
                prompt=item["prompt"],
                first=item["first"],
                second=item["second"],
                notes=[a["note"] for a in item["given"] if a["note"]],
            )
        seconds = [a["seconds"] for item in items for a in item["given"]]
        return {
            "task": task,
            "human": agreement.human_human(labels, task["overlap"]),
            "judge": judged,
            "median_seconds": statistics.median(seconds) if seconds else None,
        }

    @api.get(
        "/api/tasks/{task_id}/labels",
        summary="Every answer of the task, skips included (labeler, time, order shown, seconds)",
    )
    def task_labels(task_id: int) -> list[dict[str, Any]]:
        get_task(task_id)
        return [
            {"pair": item["source_id"], **answer}
            for item in store.items(task_id, skips=True)
            for answer in item["given"]
        ]

    @api.post("/api/tasks/{task_id}/export", summary="Write the labels as a JSONL file in the workspace")
    def export(task_id: int, body: ExportRequest) -> dict[str, Any]:
        get_task(task_id)
        out = ws.resolve(body.path, "path")
        if out.is_dir():
            raise InputError(body.path, "path", "is a folder: name the JSONL file to write")
        make = label_data.human_records if body.format == "hh" else label_data.mixed_records
        records, counts = make(store.items(task_id))
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return {"path": ws.relative(out), "format": body.format, "records": len(records), "counts": counts}

    return api
