"""How much throughput cai's critique-revision stage loses to raw `vllm.LLM.chat` on the same engine,
and what prefix caching gives on critique-revision prompts. Prints ratios measured in one run.

    .venv/bin/python benchmarks/engine_overhead.py [--prompts 32] [--max-tokens 64] [--repeats 2]

Red-team prompts are the first human turns of ../shared/data/hh-rlhf/harmless-base-test.dev.jsonl;
the model is the embedded SmolLM2 (prepared on first use). Both paths send the same request batches
(critiques, then revisions, with the same seeds); the prefix cache is reset before every timed pass
so neither path profits from the other's cached prefixes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.dev.jsonl"


def red_team_prompts(n: int) -> list[str]:
    prompts = []
    for line in HH.read_text().splitlines():
        first = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
        if first not in prompts:
            prompts.append(first)
        if len(prompts) == n:
            return prompts
    return prompts


class Recorder:
    """Passes calls to the engine and keeps each batch, so the raw path can replay the same ones."""

    def __init__(self, backend):
        self.backend = backend
        self.batches = []

    def complete(self, requests):
        self.batches.append(list(requests))
        return self.backend.complete(requests)


def raw_pass(llm, batches) -> tuple[float, int]:
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    tokens, started = 0, time.perf_counter()
    for batch in batches:
        params = [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed) for r in batch]
        outputs = llm.chat([[dict(m) for m in r.messages] for r in batch], params, use_tqdm=False)
        tokens += sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return time.perf_counter() - started, tokens


def cai_pass(backend, stage, rows, ctx_factory) -> tuple[float, int]:
    backend.llm.reset_prefix_cache()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ctx_factory(Path(tmp))
        started = time.perf_counter()
        result = stage.run(rows, ctx)
        elapsed = time.perf_counter() - started
    return elapsed, result.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from cai import constitution
    from cai.backends import BackendSpec, ChatRequest, create
    from cai.backends.cached import CachedBackend
    from cai.stages import StageContext, build
    from cai.store import RunStore

    harmless = constitution.load(ROOT / "constitutions" / "harmless.yaml")
    spec = BackendSpec(name="local", type="vllm", model="smollm2", options={"max_model_len": 4096})
    engine = create(spec)
    prompts = red_team_prompts(args.prompts)
    answers = engine.complete(
        [ChatRequest(messages=({"role": "user", "content": p},), max_tokens=args.max_tokens, temperature=0.7, seed=i) for i, p in enumerate(prompts)]
    )
    rows = [
        {"id": f"bench-{i}", "messages": [{"role": "user", "content": p}], "response": a.text}
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    stage = build("critique_revise", {"few_shot": 1, "max_tokens": args.max_tokens, "temperature": 0.0})
    recorder = Recorder(engine)

    def ctx_factory(tmp: Path):
        # cai's real path: the stage over the call cache, writing to a run directory
        cached = CachedBackend(spec.identity(), lambda: engine, RunStore(tmp), {})
        return StageContext(1, "critique_revise", harmless, {"critic": cached, "reviser": cached}, {"critic": "m", "reviser": "m"})

    stage.run(rows, StageContext(1, "critique_revise", harmless, {"critic": recorder, "reviser": recorder}, {"critic": "m", "reviser": "m"}))
    batches = recorder.batches  # warm-up pass; its batches are what both timed paths send

    cai_rates, raw_rates = [], []
    for _ in range(args.repeats):
        seconds, tokens = cai_pass(engine, stage, rows, ctx_factory)
        cai_rates.append(tokens / seconds)
        seconds, tokens = raw_pass(engine.llm, batches)
        raw_rates.append(tokens / seconds)
    engine.close()

    off = create(BackendSpec(name="local", type="vllm", model="smollm2", options={"max_model_len": 4096, "enable_prefix_caching": False}))
    off_rates = []
    for _ in range(args.repeats):
        seconds, tokens = raw_pass(off.llm, batches)
        off_rates.append(tokens / seconds)
    off.close()

    cai, raw, no_prefix = (statistics.median(r) for r in (cai_rates, raw_rates, off_rates))
    print(f"requests: {sum(len(b) for b in batches)} in {len(batches)} batches, {args.prompts} rows, max_tokens {args.max_tokens}")
    print(f"raw LLM.chat:          {raw:8.1f} generated tok/s (median of {args.repeats})")
    print(f"cai critique_revise:   {cai:8.1f} generated tok/s")
    print(f"ratio cai/raw:         {cai / raw:8.3f}   (target >= 0.95)")
    print(f"prefix caching off:    {no_prefix:8.1f} generated tok/s")
    print(f"ratio prefix on/off:   {raw / no_prefix:8.3f}")


if __name__ == "__main__":
    main()
