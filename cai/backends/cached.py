"""A backend wrapper that records every successful call in the run directory and replays it on resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cai.backends.base import Backend, ChatRequest, Completion
from cai.files import content_hash
from cai.store import RunStore


@dataclass
class CallStats:
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed_calls: int = 0


class CachedBackend:
    """Serves requests already answered from the run's call cache and sends only the rest to the engine,
    in one batch. The engine is created on the first cache miss, so a fully cached resume starts none.

    Only successes are cached: a failed request is retried when the run is resumed.
    """

    def __init__(self, identity: dict[str, Any], factory: Callable[[], Backend], store: RunStore, cache: dict[str, dict]):
        self._identity = identity
        self._factory = factory
        self._backend: Backend | None = None
        self._cache = cache
        self._writer = store.call_writer()
        self.stats = CallStats()

    def identity(self) -> dict[str, Any]:
        return self._identity

    def start(self) -> Backend:
        """The engine, created on first use."""
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def _key(self, kind: str, payload: dict[str, Any]) -> str:
        return content_hash({"backend": self._identity, "kind": kind, **payload}, length=32)

    def _record(self, finished: list[tuple[str, Completion]]) -> None:
        """Cache the successes not cached yet, in one write."""
        new = [(key, c.to_dict()) for key, c in finished if c.ok and key not in self._cache]
        self._cache.update(new)
        self._writer.append({"key": key, "completion": c} for key, c in new)

    def complete(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        keys = [self._key("complete", {"request": r.to_dict()}) for r in requests]
        misses = [i for i, k in enumerate(keys) if k not in self._cache]
        # Calls that finish one by one are recorded as they finish; a whole batch is recorded in one write.
        on_done = lambda j, completion: self._record([(keys[misses[j]], completion)])  # noqa: E731
        fresh = self.start().complete([requests[i] for i in misses], on_done) if misses else []
        self._record([(keys[i], c) for i, c in zip(misses, fresh)])
        by_index = dict(zip(misses, fresh))
        results = [by_index[i] if i in by_index else Completion.from_dict(self._cache[keys[i]]) for i in range(len(requests))]
        self.stats.calls += len(requests)
        self.stats.cached_calls += len(requests) - len(misses)
        self.stats.failed_calls += sum(not c.ok for c in fresh)
        self.stats.prompt_tokens += sum(c.prompt_tokens for c in fresh)
        self.stats.completion_tokens += sum(c.completion_tokens for c in fresh)
        return results

    def choice_logprobs(self, requests: Sequence[ChatRequest], choices: Sequence[str]) -> list[dict[str, float]]:
        keys = [self._key("choice_logprobs", {"request": r.to_dict(), "choices": list(choices)}) for r in requests]
        misses = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = self.start().choice_logprobs([requests[i] for i in misses], choices) if misses else []
        self._writer.append({"key": keys[i], "completion": lp} for i, lp in zip(misses, fresh))
        for i, lp in zip(misses, fresh):
            self._cache[keys[i]] = lp
        self.stats.calls += len(requests)
        self.stats.cached_calls += len(requests) - len(misses)
        return [self._cache[k] for k in keys]

    def close(self) -> None:
        self._writer.close()
        if self._backend is not None:
            self._backend.close()
            self._backend = None
