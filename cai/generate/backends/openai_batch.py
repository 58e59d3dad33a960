"""OpenAI's Batch API (and servers with the same /files and /batches endpoints): half the price of the
online API for answers that may take up to the completion window (24 hours).

Rows still stream: `complete()` is awaited per request, like any backend's. Requests are collected
and sent as one batch when `batch_size` are waiting, or when no new request has come for a moment
(so the last, partial batch goes too); each row's next request (a critique after its answer, a
revision after its critique) goes in a later batch. A batch goes through phases (written, uploaded,
created, done), each recorded in the run directory with an atomic write before the next starts, so
a process killed in any phase resumes the same batch: a written file is uploaded again (files cost
nothing), a batch whose creation was sent but not recorded is found again by its input file, a
created batch is polled, a finished one downloaded. A request's `custom_id` is the hash of its body,
so a resumed row asks for the same ids and waits for the batch that already holds them: nothing is
paid twice. An expired, failed or cancelled batch's unanswered requests are sent once more in a new
batch, then fail with the reason. Only answered requests are replayed from downloaded batches on
the next invocation; failed ones are asked again, as with the online backend.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cai.core.disk import read_jsonl, write_atomic
from cai.core.files import canonical_json, content_hash
from cai.generate.backends.base import BackendCallError, BackendSpec, ChatRequest, Completion, register
from cai.generate.backends.openai_api import (
    STATE_DIR,
    Endpoint,
    HTTPStatusError,
    MalformedResponse,
    OpenAISettings,
    TransientError,
    _retry_after,
    _server_message,
    api_key,
    backoff_delay,
    chat_body,
    check_server,
    choice_body,
    classify,
    parse_choice_logprobs,
    parse_completion,
)

CHAT_ENDPOINT = "/v1/chat/completions"  # the `url` of every input line, and the batch's `endpoint`
TERMINAL = {"completed", "failed", "expired", "cancelled"}
# The longest a partial batch waits for more requests. Never longer than one poll: a batch takes at
# least that long to come back, so waiting longer for stragglers only delays the rows already waiting.
FLUSH_IDLE_S = 2.0
MAX_ATTEMPTS = 2  # a request whose batch expires or fails is sent once more, then fails with the reason


@dataclass(frozen=True)
class BatchSettings:
    api: OpenAISettings
    batch_size: int = 1000
    poll_seconds: float = 30.0
    completion_window: str = "24h"
    state_dir: Path | None = None  # the run's folder for this backend; None: a temporary one (no resume)

    @classmethod
    def from_options(cls, settings: dict[str, Any]) -> "BatchSettings":
        own = ("batch_size", "poll_seconds", "completion_window")
        values = {k: settings[k] for k in own if k in settings}
        state = settings.get(STATE_DIR)
        api = OpenAISettings.from_options({k: v for k, v in settings.items() if k not in own})
        return cls(api=api, state_dir=Path(state) if state else None, **values)

    @property
    def flush_idle_s(self) -> float:
        return min(FLUSH_IDLE_S, self.poll_seconds)


class RequestFailed(Exception):
    """A request the batch could not answer: its line's error, or its batch's end after the last attempt."""


@dataclass
class BatchState:
    """One batch's record in the run directory (`NNNNNN.json`, beside its input `NNNNNN.input.jsonl`)."""

    local_id: str
    phase: str = "written"  # written -> uploaded -> created -> done
    attempt: int = 1
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    reason: str | None = None  # why a batch that ended without answering every request did so
    submitted: float = field(default_factory=time.time)


def input_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """One line of a batch input file, as OpenAI's Batch API (and vLLM's run_batch) read it."""
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}


def line_answer(line: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A batch output or error line as (the chat completion, None), or (None, why it has none)."""
    response = line.get("response") or {}
    if line.get("error"):
        error = line["error"]
        return None, f"{error.get('code') or 'error'}: {_server_message(error, '')}"
    if response.get("status_code") != 200:
        return None, f"HTTP {response.get('status_code')}: {_server_message(response.get('body'), '')}"
    return response.get("body"), None


class BatchBackend:
    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.settings = BatchSettings.from_options(spec.settings)
        [self.url] = self.settings.api.base_urls
        self._api_key = api_key(self.settings.api)
        check_server(self.url, spec.model, self._api_key, self.settings.api)
        self.dir = self.settings.state_dir or Path(tempfile.mkdtemp(prefix="cai-batches-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = Endpoint(self.url)  # requests answered, errors, latency from submission to answer
        self._rng = random.Random(0)
        self._session = None
        self._pending: dict[str, dict[str, Any]] = {}  # custom_id -> body, not yet in a batch
        self._waiters: dict[str, asyncio.Future] = {}
        self._in_batch: dict[str, str] = {}  # custom_id -> the local id of the unfinished batch holding it
        self._answers: dict[str, tuple[Path, int]] = {}  # custom_id -> its answered line in a downloaded file
        self._failed: dict[str, str] = {}  # custom_id -> reason, for this invocation only
        self._arrived: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._numbers = itertools.count(1 + max((int(p.stem) for p in self.dir.glob("[0-9]*.json")), default=0))
        self._started = False

    # --- the Backend protocol ---

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            response = await self._answer(chat_body(self.spec.model, request, self.settings.api.structured_output))
            return parse_completion(response)
        except (RequestFailed, MalformedResponse) as exc:
            return Completion(error=str(exc))

    async def choice_logprobs(self, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        body = choice_body(chat_body(self.spec.model, request, self.settings.api.structured_output))
        try:
            return parse_choice_logprobs(await self._answer(body), choices)
        except (RequestFailed, MalformedResponse) as exc:
            raise BackendCallError(f"judge: choice log-probabilities failed: {exc}") from None

    def endpoint_stats(self) -> list[dict[str, Any]]:
        return [self.endpoint.stats()]

    async def close(self) -> None:
        # Batches left unfinished keep running at the provider; the next invocation resumes them.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- requests ---

    async def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        self._start()
        custom_id = content_hash({"url": CHAT_ENDPOINT, "body": body}, length=32)
        if custom_id in self._answers:
            return self._read_answer(custom_id)
        if custom_id in self._failed:
            raise RequestFailed(self._failed[custom_id])
        waiter = self._waiters.get(custom_id)
        if waiter is None:
            waiter = self._waiters[custom_id] = asyncio.get_running_loop().create_future()
            if custom_id not in self._in_batch:  # a resumed batch holds it already: wait for that one
                self._pending[custom_id] = body
                self._arrived.set()
        return await asyncio.shield(waiter)

    def _read_answer(self, custom_id: str) -> dict[str, Any]:
        path, offset = self._answers[custom_id]
        with open(path, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())["response"]["body"]

    def _start(self) -> None:
        """On first use, inside the loop: index what earlier invocations downloaded and resume their
        unfinished batches."""
        if self._started:
            return
        self._started = True
        self._arrived = asyncio.Event()
        for path in sorted(self.dir.glob("[0-9]*.json")):
            state = BatchState(**json.loads(path.read_text(encoding="utf-8")))
            if state.phase == "done":
                self._index_answers(state)
            else:
                for custom_id in self._custom_ids(state):
                    self._in_batch[custom_id] = state.local_id
                self._spawn(self._drive(state))
        self._spawn(self._collect())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _collect(self) -> None:
        """Send a batch when batch_size requests wait, or the ones waiting when no new one has come for
        flush_idle_s."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._pending:
                if len(self._pending) >= self.settings.batch_size:
                    self._submit_new(list(itertools.islice(self._pending, self.settings.batch_size)))
                    continue
                try:
                    await asyncio.wait_for(self._arrived.wait(), self.settings.flush_idle_s)
                    self._arrived.clear()
                except asyncio.TimeoutError:
                    self._submit_new(list(self._pending))

    def _submit_new(self, custom_ids: list[str]) -> None:
        try:
            self._submit(custom_ids, attempt=1)
        except OSError as exc:  # a full or read-only disk: these requests fail, the run goes on
            for custom_id in custom_ids:
                self._pending.pop(custom_id, None)
            self._fail_all(custom_ids, f"batch input file not written: {exc}")

    def _submit(self, custom_ids: list[str], attempt: int, bodies: dict[str, dict[str, Any]] | None = None) -> None:
        """Write a batch's input file, then its state (the input first: a state always has its file)."""
        state = BatchState(local_id=f"{next(self._numbers):06d}", attempt=attempt)
        lines = []
        for custom_id in custom_ids:
            body = bodies[custom_id] if bodies is not None else self._pending.pop(custom_id)
            lines.append(canonical_json(input_line(custom_id, body)) + "\n")
            self._in_batch[custom_id] = state.local_id
        write_atomic(self._input_path(state), "".join(lines))
        self._save(state)
        self._spawn(self._drive(state))

    # --- one batch, phase by phase ---

    async def _drive(self, state: BatchState) -> None:
        try:
            if state.phase == "written":
                state.file_id = await self._upload(self._input_path(state))
                state.phase = "uploaded"
                self._save(state)
            if state.phase == "uploaded":
                # Killed after sending the create but before recording it: that batch exists, find it.
                found = await self._find_batch(state.file_id, state.submitted)
                state.batch_id = found or await self._create(state.file_id)
                state.phase = "created"
                self._save(state)
            batch = await self._poll(state.batch_id)
            state.status = batch["status"]
            state.reason = _batch_reason(batch)
            for key, suffix in (("output_file_id", "output"), ("error_file_id", "errors")):
                if batch.get(key):
                    await self._download(batch[key], self._result_path(state, suffix))
            state.phase = "done"
            self._save(state)
            self._finish(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the batch API is unreachable or refuses: its requests fail this invocation
            self._fail_all(self._custom_ids(state), f"batch {state.local_id} ({state.phase}): {exc}")

    def _finish(self, state: BatchState) -> None:
        """Hand each request of a downloaded batch its answer, resend the unanswered once, fail the rest."""
        answered, errors = self._index_answers(state)
        retry: dict[str, dict[str, Any]] = {}
        for line in read_jsonl(self._input_path(state)):
            custom_id = line["custom_id"]
            self._in_batch.pop(custom_id, None)
            if custom_id in answered:
                self.endpoint.requests += 1
                self.endpoint.succeeded(time.time() - state.submitted)
                waiter = self._waiters.pop(custom_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(self._read_answer(custom_id))
                continue
            reason = errors.get(custom_id) or f"batch {state.status}: {state.reason or 'no answer'}"
            # Not reached (its batch ended first) or expired: worth one more batch. Answered with an
            # error: asking again would only pay for the same error.
            unfinished = custom_id not in errors or reason.startswith("batch_expired")
            if unfinished and state.attempt < MAX_ATTEMPTS:
                retry[custom_id] = line["body"]
            else:
                self._fail(custom_id, f"batch API: {reason}")
        if retry:
            self._submit(list(retry), attempt=state.attempt + 1, bodies=retry)

    def _fail_all(self, custom_ids: list[str], reason: str) -> None:
        for custom_id in custom_ids:
            self._in_batch.pop(custom_id, None)
            self._fail(custom_id, reason)

    def _fail(self, custom_id: str, reason: str) -> None:
        self.endpoint.requests += 1
        self.endpoint.errors += 1
        self._failed[custom_id] = reason
        waiter = self._waiters.pop(custom_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(RequestFailed(reason))

    def _index_answers(self, state: BatchState) -> tuple[set[str], dict[str, str]]:
        """Where each answered request of a downloaded batch lies (its output file), and why each other
        one got no answer (its error line, in either file): (answered custom_ids, custom_id -> reason)."""
        answered, errors = set(), {}
        for suffix in ("output", "errors"):
            path = self._result_path(state, suffix)
            if not path.exists():
                continue
            offset = 0
            with open(path, "rb") as f:
                for raw in f:
                    line = json.loads(raw)
                    answer, reason = line_answer(line)
                    if answer is not None:
                        self._answers[line["custom_id"]] = (path, offset)
                        answered.add(line["custom_id"])
                    else:
                        errors[line["custom_id"]] = reason
                    offset += len(raw)
        return answered, errors

    # --- files ---

    def _input_path(self, state: BatchState) -> Path:
        return self.dir / f"{state.local_id}.input.jsonl"

    def _result_path(self, state: BatchState, suffix: str) -> Path:
        return self.dir / f"{state.local_id}.{suffix}.jsonl"

    def _save(self, state: BatchState) -> None:
        write_atomic(self.dir / f"{state.local_id}.json", json.dumps(asdict(state)) + "\n")

    def _custom_ids(self, state: BatchState) -> list[str]:
        return [line["custom_id"] for line in read_jsonl(self._input_path(state))]

    # --- the provider's endpoints ---

    async def _upload(self, path: Path) -> str:
        import aiohttp

        def form():  # a new form each attempt: aiohttp consumes one as it sends it
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", path.read_bytes(), filename=path.name, content_type="application/jsonl")
            return data

        return (await self._call("POST", "/files", data=form))["id"]

    async def _find_batch(self, file_id: str, since: float) -> str | None:
        """The batch made from `file_id`, if one was created. Batches are listed newest first: the search
        stops at those created before this one's input was written (a minute's clock skew allowed)."""
        after = None
        while True:
            page = await self._call("GET", "/batches", params={"limit": 100, **({"after": after} if after else {})})
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == file_id:
                    return batch["id"]
                if batch.get("created_at", since) < since - 60:
                    return None
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]

    async def _create(self, file_id: str) -> str:
        body = {
            "input_file_id": file_id,
            "endpoint": CHAT_ENDPOINT,
            "completion_window": self.settings.completion_window,
            "metadata": {"created_by": "cai"},
        }
        return (await self._call("POST", "/batches", json=body))["id"]

    async def _poll(self, batch_id: str) -> dict[str, Any]:
        while True:
            batch = await self._call("GET", f"/batches/{batch_id}")
            if batch.get("status") in TERMINAL:
                return batch
            await asyncio.sleep(self.settings.poll_seconds)

    async def _download(self, file_id: str, path: Path) -> None:
        content = await self._call("GET", f"/files/{file_id}/content", raw=True)
        write_atomic(path, content.decode("utf-8"))

    async def _call(self, method: str, path: str, raw: bool = False, data=None, **kwargs) -> Any:
        """One call to the batch API with the online backend's retries: transient faults are retried
        with backoff, a client error raises at once with the server's message."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=aiohttp.ClientTimeout(total=self.settings.api.timeout_s),
            )
        url = f"{self.url.rstrip('/')}{path}"
        attempts = self.settings.api.max_retries + 1
        for attempt in range(attempts):
            try:
                async with self._session.request(method, url, data=data() if data else None, **kwargs) as response:
                    body = await response.read()
                    if response.status != 200:
                        try:
                            detail = json.loads(body)
                        except ValueError:
                            detail = body.decode("utf-8", "replace")
                        raise HTTPStatusError(
                            response.status,
                            _server_message(detail, response.reason or ""),
                            _retry_after(response.headers),
                        )
                    return body if raw else json.loads(body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = classify(exc)
                if not isinstance(error, TransientError):
                    raise RuntimeError(f"{method} {path}: {error}") from None
                if attempt == attempts - 1:
                    raise RuntimeError(f"{method} {path}: gave up after {attempts} attempts: {error}") from None
                await asyncio.sleep(
                    backoff_delay(attempt, error.retry_after, self.settings.api.max_backoff_s, self._rng)
                )


def _batch_reason(batch: dict[str, Any]) -> str | None:
    """Why a batch ended without answering everything: its errors' first message, else its status."""
    errors = (batch.get("errors") or {}).get("data") or []
    if errors:
        return _server_message(errors[0], batch["status"])
    return None if batch["status"] == "completed" else batch["status"]


@register("openai_batch")
def create(spec: BackendSpec) -> BatchBackend:
    return BatchBackend(spec)
