"""The call cache: what was answered is replayed, what failed is asked again, nothing starts an engine
that is not needed, and a process killed between group commits keeps what was committed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

from cai.generate.backends.base import ChatRequest, Completion
from cai.generate.backends.cached import CachedBackend
from cai.generate.store import CallCache, RunStore


class CountingEngine:
    def __init__(self):
        self.sent: list[str] = []

    async def complete(self, r):
        self.sent.append(r.messages[0]["content"])
        if "fail" in r.messages[0]["content"]:
            return Completion(error="flaky")
        return Completion(texts=(r.messages[0]["content"].upper(),), completion_tokens=1, finish_reasons=("stop",))

    async def choice_logprobs(self, r, choices):
        self.sent.append(r.messages[0]["content"])
        return {c: -float(i) for i, c in enumerate(choices)}

    def endpoint_stats(self):
        return []

    async def close(self):
        pass


def req(text: str) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": text},), seed=1)


def cached(cache: CallCache, engines: list) -> CachedBackend:
    async def start():
        engines.append(CountingEngine())
        return engines[-1]

    return CachedBackend({"type": "test", "model": "m", "options": {}}, start, cache)


def ask(backend: CachedBackend, *texts: str) -> list[Completion]:
    async def go():
        return await asyncio.gather(*(backend.complete(req(t)) for t in texts))

    return asyncio.run(go())


def test_replay_after_restart_sends_only_what_is_missing(tmp_path):
    engines: list[CountingEngine] = []
    cache = RunStore(tmp_path).call_cache()
    out = ask(cached(cache, engines), "a", "please fail", "b")
    assert [c.ok for c in out] == [True, False, True]
    assert len(engines) == 1  # three concurrent first calls share one engine start
    cache.close()

    cache = RunStore(tmp_path).call_cache()  # a new process: the cache comes from the run directory
    second = cached(cache, engines)
    out = ask(second, "a", "please fail", "b", "c")
    assert sorted(engines[1].sent) == ["c", "please fail"]  # failures are retried, successes replayed
    assert [c.texts for c in out if c.ok] == [("A",), ("B",), ("C",)]
    assert second.stats.cached_calls == 2 and second.stats.completion_tokens == 1
    cache.close()


def test_fully_cached_calls_start_no_engine(tmp_path):
    engines: list[CountingEngine] = []
    cache = RunStore(tmp_path).call_cache()
    first = cached(cache, engines)
    ask(first, "a")
    asyncio.run(first.choice_logprobs(req("q"), ["(A)", "(B)"]))
    cache.close()
    cache = RunStore(tmp_path).call_cache()
    second = cached(cache, engines)
    assert ask(second, "a")[0].text == "A"
    assert asyncio.run(second.choice_logprobs(req("q"), ["(A)", "(B)"])) == {"(A)": 0.0, "(B)": -1.0}
    assert len(engines) == 1
    cache.close()


def test_key_covers_sampling_and_backend(tmp_path):
    engines: list[CountingEngine] = []
    cache = RunStore(tmp_path).call_cache()
    backend = cached(cache, engines)
    ask(backend, "a")
    asyncio.run(backend.complete(ChatRequest(messages=({"role": "user", "content": "a"},), seed=2)))
    assert engines[0].sent == ["a", "a"]  # another seed is another call
    cache.close()


def test_kill_during_group_commits_keeps_every_committed_call(tmp_path):
    """A writer commits groups of 50 calls as fast as it can and is killed with SIGKILL at a random
    moment: the file opens, holds only whole groups, and a new writer adds to it."""
    path = tmp_path / "calls" / "calls.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from cai.generate.store import CallCache
        cache = CallCache(Path({str(path)!r}))
        for group in range(100000):
            for k in range(50):
                cache.put(f"{{group}}-{{k}}", {{"texts": ["x" * 200], "group": group}})
            cache.commit()
            if group == 20:
                print("committing", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "committing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = CallCache(path)
    kept = len(cache)
    assert kept >= 21 * 50 and kept % 50 == 0  # whole groups only
    groups = kept // 50
    assert cache.get(f"{groups - 1}-49") == {"texts": ["x" * 200], "group": groups - 1}
    assert cache.get(f"{groups}-0") is None
    cache.put("after", {"ok": True})
    cache.close()
    assert CallCache(path).get("after") == {"ok": True}
