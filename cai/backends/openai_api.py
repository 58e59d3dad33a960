"""Any OpenAI-compatible chat server (a hosted API, a vLLM or other server, several of them).

Requests of a batch run concurrently (bounded by `max_concurrency`), through a shared token-bucket
limit on requests and tokens per minute, spread round-robin over the base URLs (a retry goes to the
next one). Transient faults (429, 408, 5xx, connection errors, time-outs, unreadable bodies) are
retried with exponential backoff and jitter, honouring Retry-After; other client errors fail the
request at once with the server's message. A request that still fails comes back as a Completion
with `error`, which the pipeline records in failures.jsonl; it is never a silent empty answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from cai.backends.base import BackendCallError, BackendSpec, ChatRequest, Completion, OnDone, register

RETRY_STATUS = {408, 409, 429}  # and every 5xx
# vLLM serves at most 20 log-probabilities per position by default; OpenAI allows 20 too.
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class OpenAISettings:
    base_urls: tuple[str, ...]
    api_key_env: str | None = None
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    max_backoff_s: float = 30.0
    structured_output: bool = True  # send JSON Schemas as response_format; off for servers that reject it

    @classmethod
    def from_options(cls, settings: dict[str, Any]) -> "OpenAISettings":
        urls = settings["base_url"]
        values = {k: v for k, v in settings.items() if k != "base_url"}
        return cls(base_urls=tuple([urls] if isinstance(urls, str) else urls), **values)


class TokenBucket:
    """`per_minute` units a minute, in bursts of at most that many. Waiting is cooperative: the event
    loop is single-threaded, so checking and taking happen without a lock."""

    def __init__(self, per_minute: float, clock=time.monotonic):
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.level = per_minute
        self.clock = clock
        self.updated = clock()

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0: take it now). More than the capacity waits for a full bucket."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        needed = min(amount, self.capacity)
        return 0.0 if self.level >= needed else (needed - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    async def acquire(self, amount: float) -> None:
        while (delay := self.wait_time(amount)) > 0:
            await asyncio.sleep(delay)
        self.take(amount)


class TransientError(Exception):
    """A fault worth retrying; `retry_after` is the server's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def classify(exc: BaseException) -> Exception:
    """Map a client exception to TransientError (retry) or a plain Exception with a one-line reason."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return TransientError("timed out")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError(f"connection error: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        message = _server_message(exc)
        if exc.status_code in RETRY_STATUS or exc.status_code >= 500:
            return TransientError(f"HTTP {exc.status_code}: {message}", _retry_after(exc.response.headers))
        return Exception(f"HTTP {exc.status_code}: {message}")
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, MalformedResponse)):
        return TransientError(f"unreadable response: {exc}")
    return Exception(f"{type(exc).__name__}: {exc}")


class MalformedResponse(Exception):
    """A 200 response without the fields a chat completion must have."""


def _server_message(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        body = body.get("message", body) if isinstance(body, dict) else body
    return " ".join(str(body or exc.message).split())[:500]


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from APIs; fall back to our own backoff


def backoff_delay(attempt: int, retry_after: float | None, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff (AWS's recommendation), but never sooner than Retry-After."""
    delay = rng.uniform(0, min(cap, 0.5 * 2**attempt))
    return max(delay, retry_after) if retry_after is not None else delay


class OpenAIBackend:
    def __init__(self, spec: BackendSpec):
        import openai

        self.spec = spec
        self.settings = OpenAISettings.from_options(spec.settings)
        env = self.settings.api_key_env
        if env and not os.environ.get(env):
            raise RuntimeError(f"environment variable {env} (api_key_env) is not set")
        # Servers without authentication still want some key in the header.
        self._api_key = os.environ[env] if env else "EMPTY"
        self._request_bucket = TokenBucket(self.settings.requests_per_minute) if self.settings.requests_per_minute else None
        self._token_bucket = TokenBucket(self.settings.tokens_per_minute) if self.settings.tokens_per_minute else None
        self._rng = random.Random(0)
        self._next_url = 0
        for url in self.settings.base_urls:
            self._check_server(openai, url)

    def _check_server(self, openai, url: str) -> None:
        client = openai.OpenAI(base_url=url, api_key=self._api_key, max_retries=2, timeout=min(self.settings.timeout_s, 30))
        try:
            served = [m.id for m in client.models.list()]
        except openai.AuthenticationError:
            source = f"${self.settings.api_key_env}" if self.settings.api_key_env else "no key (set api_key_env)"
            raise RuntimeError(f"{url} refused the API key from {source} (HTTP 401)") from None
        except openai.APIConnectionError as exc:
            raise RuntimeError(f"cannot reach {url}: {exc.__cause__ or exc}") from None
        except openai.APIStatusError as exc:
            raise RuntimeError(f"{url} answered HTTP {exc.status_code} to GET /models: {_server_message(exc)}") from None
        finally:
            client.close()
        if self.spec.model not in served:
            raise RuntimeError(f"{url} does not serve model {self.spec.model!r} (it serves: {', '.join(served) or 'nothing'})")

    def identity(self) -> dict[str, Any]:
        return self.spec.identity()

    # -- the sync protocol over one event loop per batch

    def complete(self, requests: Sequence[ChatRequest], on_done: OnDone | None = None) -> list[Completion]:
        return asyncio.run(self._gather([self._complete_one for _ in requests], requests, on_done))

    def choice_logprobs(self, requests: Sequence[ChatRequest], choices: Sequence[str]) -> list[dict[str, float]]:
        """Log-probability of each choice as the reply's first token, from the server's top log-probs.

        Exact for choices that are single tokens (`A`/`B`, digits); a choice outside the top 20 gets
        -inf. Multi-token choices need the local engine, which scores whole continuations.
        """
        scorer = lambda client, request: self._choice_one(client, request, choices)  # noqa: E731
        results = asyncio.run(self._gather([scorer for _ in requests], requests))
        failed = [r for r in results if isinstance(r, Completion)]
        if failed:
            raise BackendCallError(f"judge: choice log-probabilities failed for {len(failed)} of {len(results)} requests: {failed[0].error}")
        return results

    async def _gather(self, calls, requests, on_done: OnDone | None = None):
        import openai

        clients = [
            openai.AsyncOpenAI(base_url=url, api_key=self._api_key, max_retries=0, timeout=self.settings.timeout_s)
            for url in self.settings.base_urls
        ]
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        try:

            async def run(index, call, request):
                result = await self._with_retries(call, clients, semaphore, request)
                if on_done is not None:
                    on_done(index, result)
                return result

            return await asyncio.gather(*(run(i, call, r) for i, (call, r) in enumerate(zip(calls, requests))))
        finally:
            for client in clients:
                await client.close()

    async def _with_retries(self, call, clients, semaphore, request: ChatRequest):
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            client = clients[self._next_url % len(clients)]
            self._next_url += 1
            try:
                async with semaphore:
                    await self._throttle(request)
                    return await call(client, request)
            except Exception as exc:  # noqa: BLE001  every fault becomes a retry or a failed request
                error = exc if isinstance(exc, TransientError) else classify(exc)
                if not isinstance(error, TransientError):
                    return Completion(error=str(error))
                if attempt == attempts - 1:
                    return Completion(error=f"gave up after {attempts} attempts: {error}")
                await asyncio.sleep(backoff_delay(attempt, error.retry_after, self.settings.max_backoff_s, self._rng))

    async def _throttle(self, request: ChatRequest) -> None:
        if self._request_bucket:
            await self._request_bucket.acquire(1)
        if self._token_bucket:
            # Prompt tokens are estimated from characters (about 4 a token in English) plus the budget
            # for the answer: the limit is respected before the server tells us the real count.
            chars = sum(len(m["content"]) for m in request.messages)
            await self._token_bucket.acquire(math.ceil(chars / 4) + request.max_tokens * request.n)

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.spec.model,
            "messages": [dict(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.json_schema and self.settings.structured_output:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(request.json_schema), "strict": True}}
        return body

    async def _complete_one(self, client, request: ChatRequest) -> Completion:
        response = await client.chat.completions.create(**self._body(request))
        if not response.choices or any(c.message is None or c.message.content is None for c in response.choices):
            raise MalformedResponse("no message content in the response")
        usage = response.usage
        return Completion(
            texts=tuple(c.message.content for c in response.choices),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reasons=tuple(str(c.finish_reason) for c in response.choices),
        )

    async def _choice_one(self, client, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        body = {**self._body(request), "max_tokens": 1, "temperature": 0.0, "n": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        response = await client.chat.completions.create(**body)
        if not response.choices:
            raise MalformedResponse("no choices in the response")
        content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
        if not content:
            # A server without log-probabilities answers, just without them: no choice has a known
            # probability, which the judge reads as "no usable choice" (and may ask for a parsed one).
            return {choice: float("-inf") for choice in choices}
        top = {entry.token: entry.logprob for entry in content[0].top_logprobs}
        return {choice: top.get(choice, float("-inf")) for choice in choices}

    def close(self) -> None:
        pass


@register("openai")
def create(spec: BackendSpec) -> OpenAIBackend:
    return OpenAIBackend(spec)
