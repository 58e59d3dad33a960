"""A fake Batch API for tests and benchmarks: OpenAI's /v1/files and /v1/batches endpoints as they are
documented (upload with purpose=batch, create, retrieve, list, file content), answering every request
of a batch with the canned chat server's scripted answer (tests/canned_server.py, so answers depend
on the request alone). A batch moves one status a retrieve: validating -> in_progress -> finalizing
-> completed, or `expired` / `failed` when told to; an expired batch's requests are in its error file
with code batch_expired, as OpenAI writes them.

Controls for tests (POST /control): `hold` phases (upload, create, poll, download) make those calls
hang, so a client can be killed inside one (`create` hangs after the batch exists, the window where
a client has paid but not yet recorded the batch id); `expire` / `fail`: that many next batches end
so; `latency_s`: how long a batch stays in progress. GET /stats: how many times each custom_id was
answered (paid), the batches created, and which holds a call is waiting in.

    python tests/batch_server.py   # prints `listening PORT`
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter

from aiohttp import web
from canned_server import MODEL, Canned, parse

ENDPOINT = "/v1/chat/completions"


class FakeBatchAPI:
    def __init__(self):
        self.canned = Canned(parse(["--median-s", "0", "--sigma", "0"]))
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.paid: Counter[str] = Counter()
        self.ids = itertools.count(1)
        self.hold: set[str] = set()
        self.waiting: Counter[str] = Counter()  # calls hanging in each held phase now
        self.expire = 0
        self.fail = 0
        self.latency_s = 0.0

    async def held(self, phase: str) -> None:
        if phase in self.hold:
            self.waiting[phase] += 1
            await asyncio.Event().wait()  # until the client goes away

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def upload(self, request):
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None:
            return error(400, "a batch file needs purpose=batch and a file")
        await self.held("upload")
        file_id = f"file-{next(self.ids)}"
        self.files[file_id] = upload.file.read()
        return web.json_response(file_object(file_id, self.files[file_id], upload.filename))

    async def create(self, request):
        body = await request.json()
        if body.get("input_file_id") not in self.files:
            return error(404, f"no file {body.get('input_file_id')}")
        if body.get("endpoint") != ENDPOINT or body.get("completion_window") != "24h":
            return error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        batch_id = f"batch_{next(self.ids)}"
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "in_progress_since": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        await self.held("create")
        return web.json_response(self.batches[batch_id])

    async def list_batches(self, request):
        ordered = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        after = request.query.get("after")
        if after:
            ordered = ordered[[b["id"] for b in ordered].index(after) + 1 :]
        limit = int(request.query.get("limit", 20))
        return web.json_response({"object": "list", "data": ordered[:limit], "has_more": len(ordered) > limit})

    async def retrieve(self, request):
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return error(404, "no such batch")
        if batch["status"] == "validating":
            lines, problem = self.validate(self.files[batch["input_file_id"]])
            if problem or self.fail:
                self.fail -= not problem
                batch["status"] = "failed"
                batch["errors"] = {
                    "object": "list",
                    "data": [{"code": "invalid_request", "message": problem or "failed"}],
                }
            else:
                batch["status"] = "in_progress"
                batch["in_progress_since"] = time.monotonic()
                batch["request_counts"]["total"] = len(lines)
        elif batch["status"] == "in_progress":
            await self.held("poll")
            if time.monotonic() - batch["in_progress_since"] >= self.latency_s:
                batch["status"] = "finalizing"
        elif batch["status"] == "finalizing":
            await self.finish(batch)
        return web.json_response(batch)

    def validate(self, data: bytes) -> tuple[list[dict], str | None]:
        lines, seen = [], set()
        for n, raw in enumerate(data.decode().splitlines(), 1):
            line = json.loads(raw)
            if line.get("method") != "POST" or line.get("url") != ENDPOINT or "body" not in line:
                return [], f"line {n}: needs method POST, url {ENDPOINT} and a body"
            if line.get("custom_id") in seen:
                return [], f"line {n}: duplicate custom_id {line.get('custom_id')}"
            seen.add(line["custom_id"])
            lines.append(line)
        return lines, None

    async def finish(self, batch: dict) -> None:
        lines, _ = self.validate(self.files[batch["input_file_id"]])
        expired = self.expire > 0
        self.expire -= expired
        output, errors = [], []
        for line in lines:
            if expired:
                message = "This request could not be executed before the completion window expired."
                errors.append(
                    {
                        "id": f"batch_req_{next(self.ids)}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": "batch_expired", "message": message},
                    }
                )
                continue
            status, payload, _ = await self.canned.answer(ENDPOINT, json.dumps(line["body"]).encode())
            self.paid[line["custom_id"]] += 1
            answer = {
                "id": f"batch_req_{next(self.ids)}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": f"req_{next(self.ids)}", "body": payload},
                "error": None,
            }
            (output if status == 200 else errors).append(answer)
        for key, records in (("output_file_id", output), ("error_file_id", errors)):
            if records:
                file_id = f"file-{next(self.ids)}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in records).encode()
                batch[key] = file_id
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        batch["status"] = "expired" if expired else "completed"

    async def content(self, request):
        data = self.files.get(request.match_info["file_id"])
        if data is None:
            return error(404, "no such file")
        await self.held("download")
        return web.Response(body=data, content_type="application/octet-stream")

    async def control(self, request):
        body = await request.json()
        if "hold" in body:
            self.hold = set(body["hold"])
        for key in ("expire", "fail", "latency_s"):
            if key in body:
                setattr(self, key, body[key])
        return web.json_response({})

    async def stats(self, request):
        return web.json_response({"paid": dict(self.paid), "batches": len(self.batches), "waiting": dict(self.waiting)})


def file_object(file_id: str, data: bytes, filename: str) -> dict:
    return {"id": file_id, "object": "file", "bytes": len(data), "filename": filename, "purpose": "batch"}


def error(status: int, message: str):
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def app() -> web.Application:
    api = FakeBatchAPI()
    application = web.Application(client_max_size=200 << 20)
    application.add_routes(
        [
            web.get("/v1/models", api.models),
            web.post("/v1/files", api.upload),
            web.get("/v1/files/{file_id}/content", api.content),
            web.post("/v1/batches", api.create),
            web.get("/v1/batches", api.list_batches),
            web.get("/v1/batches/{batch_id}", api.retrieve),
            web.post("/control", api.control),
            web.get("/stats", api.stats),
        ]
    )
    return application


class BatchServer:
    """The fake API as a process of its own (a client killed mid-call leaves it running)."""

    def __init__(self):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline().split()[1])
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"

    def _call(self, path: str, body: dict | None = None) -> dict:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.root}{path}", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def control(self, **settings) -> None:
        self._call("/control", settings)

    def stats(self) -> dict:
        return self._call("/stats")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "BatchServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def main() -> None:
    runner = web.AppRunner(app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
