"""The backend protocol every generation engine implements, and the registry pipelines pick from.

A backend answers one request at a time, asynchronously, and batches internally as its engine likes
(vLLM's continuous batching, an API's concurrency): the pipeline keeps many requests outstanding and
never waits for a batch to fill. `create` gives a blocking facade over the same backend for callers
that hold a whole batch at once (rejection sampling, eval-judge, notebooks without a loop).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar, runtime_checkable

from cai.core.registry import Registry
from cai.generate.records import Message

T = TypeVar("T")


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make. `seed` makes sampling reproducible per request."""

    messages: tuple[Message, ...]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    # Structured output: the reply must match this JSON Schema (kept as JSON text, so requests stay
    # immutable and their cache keys canonical). Backends that cannot enforce it still pass it on.
    json_schema: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [dict(m) for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
            "n": self.n,
            "json_schema": self.json_schema,
        }


@dataclass(frozen=True)
class Completion:
    """The result of one ChatRequest: `n` texts, token counts, or an error that fails only this request."""

    texts: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: tuple[str, ...] = ()
    error: str | None = None

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "texts": list(self.texts),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": list(self.finish_reasons),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Completion":
        return cls(
            texts=tuple(d["texts"]),
            prompt_tokens=d["prompt_tokens"],
            completion_tokens=d["completion_tokens"],
            finish_reasons=tuple(d["finish_reasons"]),
            error=d["error"],
        )


@runtime_checkable
class Backend(Protocol):
    """A generation engine, used from one event loop. Created (and started: engines load, servers are
    checked) by its registered factory, which may block and so runs in a worker thread."""

    async def complete(self, request: ChatRequest) -> Completion:
        """The completion, or one carrying `error` when this request cannot be answered after retries."""

    async def choice_logprobs(self, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        """The log-probability of each choice string as the assistant's reply; raises BackendCallError."""

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Per endpoint: requests, errors, latency percentiles (empty for in-process engines)."""

    async def close(self) -> None:
        """Release the engine's processes, connections and memory."""


@dataclass(frozen=True)
class BackendSpec:
    """A backend as a pipeline declares it."""

    name: str
    type: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)  # change outputs: part of the call-cache key
    settings: dict[str, Any] = field(default_factory=dict)  # how to reach and pace it (URLs, limits): not in the key
    base_dirs: tuple[str, ...] = ()  # where a relative local model path is looked up, in order

    def identity(self) -> dict[str, Any]:
        """What determines a backend's outputs; part of every call-cache key."""
        return {"type": self.type, "model": self.model, "options": self.options}


class BackendCallError(Exception):
    """A call that could not be answered after retries; the row that needed it fails (and is retried
    on the next run) instead of the run stopping."""


class BackendStartError(Exception):
    """A declared backend could not start (model missing, engine refused); the message says which."""


BACKENDS: Registry[Callable[[BackendSpec], Backend]] = Registry("backend type")
register = BACKENDS.register


async def start(spec: BackendSpec) -> Backend:
    """Create and start the backend a spec declares, off the event loop (engines take seconds to load)."""
    factory = BACKENDS[spec.type]
    try:
        return await asyncio.to_thread(factory, spec)
    except Exception as exc:  # engines raise anything from ValueError to RuntimeError; all mean the same here
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise BackendStartError(
            f"backend {spec.name!r} ({spec.type}, model {spec.model!r}) failed to start: {detail}"
        ) from exc


class LoopThread:
    """An event loop on a thread of its own, so blocking code (and code already inside a running loop,
    like a notebook's) can run coroutines to completion."""

    def __init__(self, name: str = "cai-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def run_blocking(coroutine: Awaitable[T]) -> T:
    """Run a coroutine to its end from blocking code: on a new event loop, or, when this thread already
    runs one (a notebook, a service), on a loop thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    loop = LoopThread()
    try:
        return loop.run(coroutine)
    finally:
        loop.stop()


class BlockingBackend:
    """A backend for callers that hold whole batches: each call sends every request at once and returns
    when all are answered. The backend lives on a loop thread of its own for its whole life."""

    def __init__(self, spec: BackendSpec):
        self._loop = LoopThread(f"cai-backend-{spec.name}")
        try:
            self.backend = self._loop.run(start(spec))
        except BaseException:
            self._loop.stop()
            raise

    def complete(
        self, requests: Sequence[ChatRequest], progress: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Every request's completion, in order; `progress(done)` after each one that finishes."""
        return self._loop.run(_gather((self.backend.complete(r) for r in requests), progress))

    def choice_logprobs(self, requests: Sequence[ChatRequest], choices: Sequence[str]) -> list[dict[str, float]]:
        return self._loop.run(_gather(self.backend.choice_logprobs(r, choices) for r in requests))

    def close(self) -> None:
        try:
            self._loop.run(self.backend.close())
        finally:
            self._loop.stop()


async def _gather(coroutines, progress: Callable[[int], None] | None = None) -> list:
    if progress is None:
        return list(await asyncio.gather(*coroutines))
    done = 0

    async def counted(coroutine):
        nonlocal done
        result = await coroutine
        done += 1
        progress(done)
        return result

    return list(await asyncio.gather(*(counted(c) for c in coroutines)))


def create(spec: BackendSpec) -> BlockingBackend:
    """The backend a spec declares, started, behind the blocking batch facade."""
    return BlockingBackend(spec)
