"""The call cache: what was answered is replayed, what failed is asked again, nothing starts an engine
that is not needed."""

from __future__ import annotations

from cai.backends.base import ChatRequest, Completion
from cai.backends.cached import CachedBackend
from cai.store import RunStore


class CountingEngine:
    def __init__(self):
        self.sent: list[str] = []

    def complete(self, requests, on_done=None):
        self.sent.extend(r.messages[0]["content"] for r in requests)
        return [
            Completion(error="flaky") if "fail" in r.messages[0]["content"] else Completion(texts=(r.messages[0]["content"].upper(),), completion_tokens=1, finish_reasons=("stop",))
            for r in requests
        ]

    def choice_logprobs(self, requests, choices):
        self.sent.extend(r.messages[0]["content"] for r in requests)
        return [{c: -float(i) for i, c in enumerate(choices)} for _ in requests]

    def close(self):
        pass


def req(text: str) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": text},), seed=1)


def cached(tmp_path, engines: list) -> CachedBackend:
    store = RunStore(tmp_path)

    def factory():
        engines.append(CountingEngine())
        return engines[-1]

    return CachedBackend({"type": "test", "model": "m", "options": {}}, factory, store, store.cached_calls())


def test_replay_after_restart_sends_only_what_is_missing(tmp_path):
    engines: list[CountingEngine] = []
    first = cached(tmp_path, engines)
    out = first.complete([req("a"), req("please fail"), req("b")])
    assert [c.ok for c in out] == [True, False, True]
    first.close()

    second = cached(tmp_path, engines)  # a new process: the cache comes from the run directory
    out = second.complete([req("a"), req("please fail"), req("b"), req("c")])
    assert engines[1].sent == ["please fail", "c"]  # failures are retried, successes replayed
    assert [c.texts for c in out if c.ok] == [("A",), ("B",), ("C",)]
    assert second.stats.cached_calls == 2 and second.stats.completion_tokens == 1
    second.close()


def test_fully_cached_calls_start_no_engine(tmp_path):
    engines: list[CountingEngine] = []
    first = cached(tmp_path, engines)
    first.complete([req("a")])
    first.choice_logprobs([req("q")], ["(A)", "(B)"])
    first.close()
    second = cached(tmp_path, engines)
    assert second.complete([req("a")])[0].text == "A"
    assert second.choice_logprobs([req("q")], ["(A)", "(B)"]) == [{"(A)": 0.0, "(B)": -1.0}]
    assert len(engines) == 1


def test_key_covers_sampling_and_backend(tmp_path):
    engines: list[CountingEngine] = []
    backend = cached(tmp_path, engines)
    backend.complete([req("a")])
    backend.complete([ChatRequest(messages=({"role": "user", "content": "a"},), seed=2)])
    assert engines[0].sent == ["a", "a"]  # another seed is another call


class DiesMidBatch(CountingEngine):
    """Reports each request as it finishes, then dies before the batch ends (a kill, say)."""

    def complete(self, requests, on_done=None):
        for index, completion in enumerate(super().complete(requests[:2])):
            on_done(index, completion)
        raise KeyboardInterrupt


def test_calls_finished_before_a_crash_are_kept(tmp_path):
    store = RunStore(tmp_path)
    dying = CachedBackend({"type": "test"}, DiesMidBatch, store, store.cached_calls())
    try:
        dying.complete([req("a"), req("b"), req("c")])
    except KeyboardInterrupt:
        pass
    dying.close()
    store = RunStore(tmp_path)
    engine = CountingEngine()
    resumed = CachedBackend({"type": "test"}, lambda: engine, store, store.cached_calls())
    assert [c.text for c in resumed.complete([req("a"), req("b"), req("c")])] == ["A", "B", "C"]
    assert engine.sent == ["c"]
