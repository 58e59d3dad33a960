"""The backend protocol every generation engine implements, and the registry pipelines pick from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from cai.registry import Registry

Message = dict[str, str]


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
        out = asdict(self)
        out["messages"] = [dict(m) for m in self.messages]
        out["stop"] = list(self.stop)
        return out


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


OnDone = Callable[[int, Completion], None]


@runtime_checkable
class Backend(Protocol):
    """A generation engine. Calls take a whole batch so engines can schedule it at once."""

    def identity(self) -> dict[str, Any]:
        """What determines outputs (type, model, options that change texts): the call cache key's prefix."""

    def complete(self, requests: Sequence[ChatRequest], on_done: OnDone | None = None) -> list[Completion]:
        """One Completion per request, in order. A request that fails carries `error`; others still succeed.

        Backends whose requests finish one by one call `on_done(index, completion)` as each does, so the
        call cache keeps it even if the process dies before the batch ends."""

    def choice_logprobs(self, requests: Sequence[ChatRequest], choices: Sequence[str]) -> list[dict[str, float]]:
        """For each request, the log-probability of each choice string as the assistant's reply."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


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
    """A batch call that could not be answered after retries; the rows that needed it fail (and are
    retried on the next run) instead of the run stopping."""


class BackendStartError(Exception):
    """A declared backend could not start (model missing, engine refused); the message says which."""


BACKENDS: Registry[Callable[[BackendSpec], Backend]] = Registry("backend type")
register = BACKENDS.register


def create(spec: BackendSpec) -> Backend:
    factory = BACKENDS[spec.type]
    try:
        return factory(spec)
    except Exception as exc:  # engines raise anything from ValueError to RuntimeError; all mean the same here
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise BackendStartError(f"backend {spec.name!r} ({spec.type}, model {spec.model!r}) failed to start: {detail}") from exc
