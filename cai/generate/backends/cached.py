"""A backend wrapper that records every successful call in the run's call cache and replays it on resume."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from cai.core.files import content_hash
from cai.generate.backends.base import Backend, ChatRequest, Completion
from cai.generate.store import CallCache


@dataclass
class CallStats:
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CachedBackend:
    """Serves requests already answered from the run's call cache and sends only the rest to the engine.
    The engine is started on the first cache miss (all waiting callers share that one start), so a
    fully cached resume starts none.

    Only successes are cached: a failed request is retried when the run is resumed.
    """

    def __init__(self, identity: dict[str, Any], starter: Callable[[], Awaitable[Backend]], cache: CallCache):
        self._identity = identity
        self._starter = starter
        self._started: asyncio.Task | None = None
        self._cache = cache
        self.stats = CallStats()

    async def start(self) -> Backend:
        """The engine, started on first use."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._starter())
        return await self._started

    @property
    def started(self) -> Backend | None:
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            return None
        return self._started.result()

    def _key(self, kind: str, payload: dict[str, Any]) -> str:
        return content_hash({"backend": self._identity, "kind": kind, **payload}, length=32)

    async def complete(self, request: ChatRequest) -> Completion:
        key = self._key("complete", {"request": request.to_dict()})
        hit = self._cache.get(key)
        if hit is not None:
            self.stats.cached_calls += 1
            return Completion.from_dict(hit)
        completion = await (await self.start()).complete(request)
        if completion.ok:
            self._cache.put(key, completion.to_dict())
            self.stats.prompt_tokens += completion.prompt_tokens
            self.stats.completion_tokens += completion.completion_tokens
        return completion

    async def choice_logprobs(self, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        key = self._key("choice_logprobs", {"request": request.to_dict(), "choices": list(choices)})
        hit = self._cache.get(key)
        if hit is not None:
            self.stats.cached_calls += 1
            return hit
        scores = await (await self.start()).choice_logprobs(request, choices)
        self._cache.put(key, scores)
        return scores

    def endpoint_stats(self) -> list[dict[str, Any]]:
        backend = self.started
        return backend.endpoint_stats() if backend is not None else []

    async def close(self) -> None:
        backend = self.started
        if backend is not None:
            await backend.close()
        elif self._started is not None and not self._started.done():
            self._started.cancel()
