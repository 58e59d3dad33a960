"""Any OpenAI-compatible chat server (a hosted API, a vLLM or other server, a fleet of them).

One HTTP session (one connection pool) per base URL for the backend's whole life. Requests run concurrently,
bounded by `max_concurrency` over all endpoints, through a shared token-bucket limit on requests and
tokens per minute (token estimates are corrected by the usage the server reports). Each request goes to
the endpoint with the fewest outstanding requests, so a slow server gets less work than a fast one; an
endpoint that fails several times in a row is set aside for a while (doubling up to a minute) and
then tried again with one request, while the others serve its share. Transient faults (429, 408,
5xx, connection errors, time-outs, unreadable bodies) are retried with exponential backoff and
jitter, honouring Retry-After, on another endpoint when there is one; other client errors fail the
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
from array import array
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from cai.generate.backends.base import BackendCallError, BackendSpec, ChatRequest, Completion, register

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
        # prices: the run's accounting, not the client's; state_dir: where stateful backends keep state
        values = {k: v for k, v in settings.items() if k not in ("base_url", "prices", STATE_DIR)}
        return cls(base_urls=tuple(base_urls(settings)), **values)


# The setting the pipeline adds to every backend's spec: a folder of the run directory for backends that
# keep state across invocations (the batch backend's batches); the others ignore it.
STATE_DIR = "state_dir"


def base_urls(settings: dict[str, Any]) -> list[str]:
    """The endpoints of a backend's `base_url`: one URL, or a list of them."""
    urls = settings["base_url"]
    return [urls] if isinstance(urls, str) else list(urls)


def api_key(settings: OpenAISettings) -> str:
    """The key from the environment variable `api_key_env` names; raises when it is unset."""
    env = settings.api_key_env
    if env and not os.environ.get(env):
        raise RuntimeError(f"environment variable {env} (api_key_env) is not set")
    # Servers without authentication still want some key in the header.
    return os.environ[env] if env else "EMPTY"


def check_server(url: str, model: str, key: str, settings: OpenAISettings) -> None:
    """Raise a one-line RuntimeError unless the server at `url` answers, takes the key and serves `model`."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=2, timeout=min(settings.timeout_s, 30))
    try:
        served = [m.id for m in client.models.list()]
    except openai.AuthenticationError:
        source = f"${settings.api_key_env}" if settings.api_key_env else "no key (set api_key_env)"
        raise RuntimeError(f"{url} refused the API key from {source} (HTTP 401)") from None
    except openai.APIConnectionError as exc:
        raise RuntimeError(f"cannot reach {url}: {exc.__cause__ or exc}") from None
    except openai.APIStatusError as exc:
        raise RuntimeError(
            f"{url} answered HTTP {exc.status_code} to GET /models: {_server_message(exc.body, exc.message)}"
        ) from None
    finally:
        client.close()
    if model not in served:
        raise RuntimeError(f"{url} does not serve model {model!r} (it serves: {', '.join(served) or 'nothing'})")


def chat_body(model: str, request: ChatRequest, structured_output: bool) -> dict[str, Any]:
    """The body of POST /chat/completions for a request (also a batch input line's `body`)."""
    body: dict[str, Any] = {
        "model": model,
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
    if request.json_schema and structured_output:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": json.loads(request.json_schema), "strict": True},
        }
    return body


def choice_body(body: dict[str, Any]) -> dict[str, Any]:
    """A chat body turned into the one-token request whose top log-probabilities score the choices."""
    return {**body, "max_tokens": 1, "temperature": 0.0, "n": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS}


def parse_completion(response: Any) -> Completion:
    """A chat completion's JSON as a Completion; raises MalformedResponse without choices or content."""
    if not isinstance(response, dict) or not response.get("choices"):
        raise MalformedResponse("no choices in the response")
    choices = response["choices"]
    if any(not isinstance((c.get("message") or {}).get("content"), str) for c in choices):
        raise MalformedResponse("no message content in the response")
    usage = response.get("usage") or {}
    return Completion(
        texts=tuple(c["message"]["content"] for c in choices),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        finish_reasons=tuple(str(c.get("finish_reason")) for c in choices),
    )


def parse_choice_logprobs(response: Any, choices: Sequence[str]) -> dict[str, float]:
    """Log-probability of each choice as the reply's first token, from a `choice_body` answer's top
    log-probs: exact for single-token choices (`A`/`B`, digits); one outside the top 20 gets -inf."""
    if not isinstance(response, dict) or not response.get("choices"):
        raise MalformedResponse("no choices in the response")
    content = (response["choices"][0].get("logprobs") or {}).get("content")
    if not content:
        # A server without log-probabilities answers, just without them: no choice has a known
        # probability, which the judge reads as "no usable choice" (and may ask for a parsed one).
        return {choice: float("-inf") for choice in choices}
    top = {entry["token"]: entry["logprob"] for entry in content[0].get("top_logprobs") or []}
    return {choice: top.get(choice, float("-inf")) for choice in choices}


# Bursts of at most this many seconds' worth of a limit: providers enforce per-minute limits over
# shorter windows too, so a run paces itself evenly instead of spending a whole minute's quota at once.
BURST_S = 5.0


class TokenBucket:
    """`per_minute` units a minute, in bursts of at most `burst_s` seconds' worth. Checking and taking
    happen on the event loop's one thread, so no lock guards the level (one orders the waiters)."""

    def __init__(self, per_minute: float, clock=time.monotonic, burst_s: float = 60.0):
        self.capacity = per_minute * burst_s / 60.0
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()
        self._lock: asyncio.Lock | None = None

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0: take it now). More than the capacity waits for a full bucket."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        needed = min(amount, self.capacity)
        return 0.0 if self.level >= needed else (needed - self.level) / self.rate

    def take(self, amount: float) -> None:
        """Take `amount` (a negative amount gives back what an estimate took too much)."""
        self.level = min(self.capacity, self.level - amount)

    async def acquire(self, amount: float) -> None:
        # One waiter at a time, in arrival order: the others queue on the lock instead of all waking to
        # race for each refill.
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while (delay := self.wait_time(amount)) > 0:
                await asyncio.sleep(delay)
            self.take(amount)


class TransientError(Exception):
    """A fault worth retrying; `retry_after` is the server's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class HTTPStatusError(Exception):
    """A non-200 answer: its status, the server's message and its Retry-After."""

    def __init__(self, status: int, message: str, retry_after: float | None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


def classify(exc: BaseException) -> Exception:
    """Map a client exception to TransientError (retry) or a plain Exception with a one-line reason."""
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError):
        return TransientError("timed out")
    if isinstance(exc, HTTPStatusError):
        if exc.status in RETRY_STATUS or exc.status >= 500:
            return TransientError(str(exc), exc.retry_after)
        return Exception(str(exc))
    if isinstance(exc, aiohttp.ClientPayloadError | json.JSONDecodeError | MalformedResponse):
        return TransientError(f"unreadable response: {exc}")
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return TransientError(f"connection error: {' '.join(str(exc).split()) or type(exc).__name__}")
    return Exception(f"{type(exc).__name__}: {exc}")


def _tokens_used(usage: dict[str, Any]) -> int | None:
    """What the server counted against a tokens-per-minute limit, when it said."""
    if "prompt_tokens" not in usage:
        return None
    return (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)


class MalformedResponse(Exception):
    """A 200 response without the fields a chat completion must have."""


def _server_message(body: Any, fallback: str) -> str:
    """The message of an OpenAI-style error body (`{"error": {"message": ...}}` or `{"message": ...}`)."""
    if isinstance(body, dict):
        body = body.get("error", body)
        body = body.get("message", body) if isinstance(body, dict) else body
    return " ".join(str(body or fallback).split())[:500]


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


# An endpoint that fails this many times in a row is set aside, first for SET_ASIDE_S, then twice as
# long after each failed trial, up to SET_ASIDE_MAX_S.
SET_ASIDE_AFTER = 3
SET_ASIDE_S = 2.0
SET_ASIDE_MAX_S = 60.0


@dataclass
class Endpoint:
    """One base URL: its session and what the summary reports of it."""

    url: str
    session: Any = None  # an aiohttp session: one connection pool for the run
    outstanding: int = 0
    requests: int = 0
    errors: int = 0
    consecutive_failures: int = 0
    aside_until: float = 0.0
    aside_s: float = SET_ASIDE_S
    times_set_aside: int = 0
    latencies: array = field(default_factory=lambda: array("f"))

    def available(self, now: float) -> bool:
        return now >= self.aside_until

    def succeeded(self, latency: float) -> None:
        self.latencies.append(latency)
        self.consecutive_failures = 0
        self.aside_s = SET_ASIDE_S

    def failed(self, now: float, can_set_aside: bool) -> None:
        self.errors += 1
        self.consecutive_failures += 1
        if can_set_aside and self.consecutive_failures >= SET_ASIDE_AFTER:
            # Set aside; when the time is up one trial request decides: a failure sets it aside again, longer.
            self.aside_until = now + self.aside_s
            self.aside_s = min(SET_ASIDE_MAX_S, self.aside_s * 2)
            self.consecutive_failures = SET_ASIDE_AFTER - 1
            self.times_set_aside += 1

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None

        return {
            "url": self.url,
            "requests": self.requests,
            "errors": self.errors,
            "set_aside": self.times_set_aside,
            "latency_p50_s": pct(0.5),
            "latency_p90_s": pct(0.9),
            "latency_p99_s": pct(0.99),
        }


class EndpointPool:
    """Picks the endpoint with the fewest outstanding requests among those not set aside (the fewest
    requests so far breaks ties, so idle endpoints share the start). With one endpoint nothing is ever
    set aside: there is nowhere else to send its work, and backoff already paces the retries."""

    def __init__(self, urls: Sequence[str], clock: Callable[[], float] = time.monotonic):
        self.endpoints = [Endpoint(url) for url in urls]
        self.clock = clock

    def pick(self, avoid: Endpoint | None = None) -> tuple[Endpoint, float]:
        """The endpoint to use and how long to wait before using it (when every one is set aside)."""
        now = self.clock()
        candidates = [e for e in self.endpoints if e.available(now)]
        if len(candidates) > 1 and avoid in candidates:
            candidates.remove(avoid)  # a retry goes elsewhere when it can
        if not candidates:
            soonest = min(self.endpoints, key=lambda e: e.aside_until)
            return soonest, soonest.aside_until - now
        return min(candidates, key=lambda e: (e.outstanding, e.requests)), 0.0

    def failed(self, endpoint: Endpoint) -> None:
        endpoint.failed(self.clock(), can_set_aside=len(self.endpoints) > 1)


class OpenAIBackend:
    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.settings = OpenAISettings.from_options(spec.settings)
        self._api_key = api_key(self.settings)
        self._request_bucket = (
            TokenBucket(self.settings.requests_per_minute, burst_s=BURST_S)
            if self.settings.requests_per_minute
            else None
        )
        self._token_bucket = (
            TokenBucket(self.settings.tokens_per_minute, burst_s=BURST_S) if self.settings.tokens_per_minute else None
        )
        self._rng = random.Random(0)
        self.pool = EndpointPool(self.settings.base_urls)
        self._semaphore: asyncio.Semaphore | None = None
        for url in self.settings.base_urls:
            check_server(url, spec.model, self._api_key, self.settings)

    def endpoint_stats(self) -> list[dict[str, Any]]:
        return [e.stats() for e in self.pool.endpoints]

    async def complete(self, request: ChatRequest) -> Completion:
        result, reason = await self._with_retries(self._complete_one, request)
        return result if reason is None else Completion(error=reason)

    async def choice_logprobs(self, request: ChatRequest, choices: Sequence[str]) -> dict[str, float]:
        """Log-probability of each choice as the reply's first token, from the server's top log-probs.

        Exact for choices that are single tokens (`A`/`B`, digits); a choice outside the top 20 gets
        -inf. Multi-token choices need the local engine, which scores whole continuations.
        """
        result, reason = await self._with_retries(lambda endpoint, r: self._choice_one(endpoint, r, choices), request)
        if reason is not None:
            raise BackendCallError(f"judge: choice log-probabilities failed: {reason}")
        return result

    async def _with_retries(self, call: Callable[[Any, ChatRequest], Awaitable[Any]], request: ChatRequest):
        """(the call's result, None), or (None, why it failed) after retries, or at once for a client error."""
        if self._semaphore is None:  # bound to the loop the backend is used from, not the one that built it
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        attempts = self.settings.max_retries + 1
        last: Endpoint | None = None
        for attempt in range(attempts):
            async with self._semaphore:
                endpoint, wait = self.pool.pick(avoid=last)
                if wait > 0:
                    await asyncio.sleep(wait)
                last = endpoint
                estimate = await self._throttle(request)
                if endpoint.session is None:
                    endpoint.session = self._session()
                endpoint.outstanding += 1
                endpoint.requests += 1
                started = time.monotonic()
                try:
                    result, used = await call(endpoint, request)
                except Exception as exc:  # every fault becomes a retry or a failed request
                    error = exc if isinstance(exc, TransientError) else classify(exc)
                    if not isinstance(error, TransientError):
                        endpoint.succeeded(time.monotonic() - started)  # the server answered; the request was wrong
                        return None, str(error)
                    self.pool.failed(endpoint)
                else:
                    endpoint.succeeded(time.monotonic() - started)
                    if self._token_bucket and used is not None:
                        self._token_bucket.take(used - estimate)  # the server's count replaces our estimate
                    return result, None
                finally:
                    endpoint.outstanding -= 1
            if attempt == attempts - 1:
                return None, f"gave up after {attempts} attempts: {error}"
            await asyncio.sleep(backoff_delay(attempt, error.retry_after, self.settings.max_backoff_s, self._rng))

    async def _throttle(self, request: ChatRequest) -> int:
        """Wait for the rate limits; returns the tokens taken from the token bucket (an estimate)."""
        if self._request_bucket:
            await self._request_bucket.acquire(1)
        if not self._token_bucket:
            return 0
        # Prompt tokens are estimated from characters (about 4 a token in English) plus the budget for the
        # answer: the limit is respected before the server tells us the real count.
        estimate = math.ceil(sum(len(m["content"]) for m in request.messages) / 4) + request.max_tokens * request.n
        await self._token_bucket.acquire(estimate)
        return estimate

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        return chat_body(self.spec.model, request, self.settings.structured_output)

    def _session(self):
        """An aiohttp session for one endpoint. Not the OpenAI SDK's client for the calls themselves:
        its typed models and httpx's connection pool (which checks every pooled connection on every
        request) cost several milliseconds of CPU a call, which at hundreds of calls a second is
        what limits a run; the SDK still makes the start-up checks."""
        import aiohttp

        return aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),  # max_concurrency bounds connections
        )

    async def _create(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """POST a chat completion and return its JSON as it came."""
        async with endpoint.session.post(f"{endpoint.url.rstrip('/')}/chat/completions", json=body) as response:
            text = await response.text()
            if response.status != 200:
                try:
                    detail = json.loads(text)
                except ValueError:
                    detail = text
                raise HTTPStatusError(
                    response.status, _server_message(detail, response.reason or ""), _retry_after(response.headers)
                )
        return json.loads(text)

    async def _complete_one(self, endpoint: Endpoint, request: ChatRequest) -> tuple[Completion, int | None]:
        response = await self._create(endpoint, self._body(request))
        return parse_completion(response), _tokens_used(response.get("usage") or {})

    async def _choice_one(
        self, endpoint: Endpoint, request: ChatRequest, choices: Sequence[str]
    ) -> tuple[dict[str, float], int | None]:
        response = await self._create(endpoint, choice_body(self._body(request)))
        return parse_choice_logprobs(response, choices), _tokens_used(response.get("usage") or {})

    async def close(self) -> None:
        for endpoint in self.pool.endpoints:
            if endpoint.session is not None:
                await endpoint.session.close()
                endpoint.session = None


@register("openai")
def create(spec: BackendSpec) -> OpenAIBackend:
    return OpenAIBackend(spec)
