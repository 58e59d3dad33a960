"""SL-CAI on the local engine: `cai run` against a per-row chain written by hand on vLLM's AsyncLLM (each
row's respond -> critique -> revise awaited in turn, every row at once), with the same model, prompts,
principles, seeds and lengths, the same engine settings; and, with --before, against the batch engine
cai had before streaming (a checkout of that commit). Prints generated tokens/s of each and the ratios.

    .venv/bin/python benchmarks/engine_local.py [--prompts 48] [--max-tokens 64] [--rounds 2] [--before /tmp/cai-before]

Red-team prompts are the first human turns of ../shared/data/hh-rlhf/harmless-base-test.dev.jsonl; the
model is the embedded SmolLM2. Each side runs in its own process; the clock starts when its engine is
ready (cai: the run summary's per-stage time, which starts after the engine's start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.dev.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
SEED = 1234


def write_prompts(path: Path, n: int) -> Path:
    seen: list[str] = []
    for line in HH.read_text().splitlines():
        first = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
        if first not in seen:
            seen.append(first)
        if len(seen) == n:
            break
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(seen)))
    return path


def write_pipeline(folder: Path, prompts: Path, max_tokens: int) -> Path:
    doc = {
        "name": "bench-local",
        "seed": SEED,
        "constitution": str(CONSTITUTION),
        "prompts": str(prompts),
        "backends": {"local": {"type": "vllm", "model": "smollm2", "options": {"max_model_len": 4096}}},
        "roles": {"responder": "local", "critic": "local", "reviser": "local"},
        "stages": [
            {"type": "respond", "max_tokens": max_tokens, "temperature": 0.7},
            {"type": "critique_revise", "max_tokens": max_tokens, "temperature": 0.7},
        ],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def hand_chain(prompts_path: Path, max_tokens: int) -> dict:
    """The per-row chain a user would write on AsyncLLM: the requests cai's stages make, without cai."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from cai.core import models
    from cai.core.seeding import derive_seed, rng
    from cai.generate import constitution, prompts
    from cai.generate.backends.local_vllm import engine_args

    harmless = constitution.load(CONSTITUTION)
    rows = prompts.load(prompts_path)
    args = {"disable_log_stats": True, **engine_args({"max_model_len": 4096})}
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(models.resolve("smollm2", [])), **args))
    tokenizer = engine.get_tokenizer()
    counter = iter(range(10**9))
    tokens = 0

    async def generate(messages, seed) -> str:
        nonlocal tokens
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.7, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY
        )
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=str(next(counter))):
            final = out
        tokens += len(final.outputs[0].token_ids)
        return final.outputs[0].text.strip()

    async def chain(row) -> None:
        messages = [dict(m) for m in row.messages]
        answer = await generate(messages, derive_seed(SEED, row.id, "respond"))
        principle = harmless.draw(rng(SEED, row.id, "critique_revise", 0))
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": principle.critique}]
        critique = await generate(messages, derive_seed(SEED, row.id, "critique_revise", 0, "critic"))
        messages += [{"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]
        await generate(messages, derive_seed(SEED, row.id, "critique_revise", 0, "reviser"))

    started = time.perf_counter()
    await asyncio.gather(*(chain(row) for row in rows))
    seconds = time.perf_counter() - started
    engine.shutdown()
    return {"seconds": seconds, "tokens": tokens}


def cai_side(pipeline: Path, run_dir: Path, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "cai.cli", "run", str(pipeline), "--run-dir", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    if done.returncode != 0:
        sys.exit(f"cai run ({tree}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    # per stage: "  respond   48/48 rows (48 new, 0 failed), 3072 tokens, 41.0 s"; stages run one after
    # the other in the batch engine and at once in the streaming one: the run is the sum, or the longest
    stages = [(int(t), float(s)) for t, s in re.findall(r"rows \(.*?\), (\d+) tokens, ([\d.]+) s", done.stdout)]
    # cai/progress.py before the regroup into layers, cai/generate/progress.py after it
    progress = next(p for p in (tree / "cai" / "generate" / "progress.py", tree / "cai" / "progress.py") if p.exists())
    streaming = "in flight" in progress.read_text()
    seconds = max(s for _, s in stages) if streaming else sum(s for _, s in stages)
    return {"seconds": seconds, "tokens": sum(t for t, _ in stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--before", type=Path, help="a checkout of cai before the streaming engine (git worktree add DIR 1ca81ef)"
    )
    parser.add_argument("--hand", type=Path, help=argparse.SUPPRESS)  # the child process of the hand-written side
    args = parser.parse_args()
    if args.hand:
        print(json.dumps(asyncio.run(hand_chain(args.hand, args.max_tokens))))
        return
    sides = ["cai", "hand"] + (["before"] if args.before else [])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = write_prompts(folder / "prompts.jsonl", args.prompts)
        pipeline = write_pipeline(folder, prompts, args.max_tokens)
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                run_dir = folder / f"{side}-{round_}"
                if side == "hand":
                    done = subprocess.run(
                        [sys.executable, __file__, "--hand", str(prompts), "--max-tokens", str(args.max_tokens)],
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode != 0:
                        sys.exit(f"hand chain failed:\n{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                else:
                    result = cai_side(pipeline, run_dir, ROOT if side == "cai" else args.before)
                results[side].append(result)
                print(
                    f"round {round_ + 1} {side:<6} {result['tokens'] / result['seconds']:.1f} generated tok/s ({result['tokens']} tokens in {result['seconds']:.1f} s)",
                    flush=True,
                )
    rate = {side: statistics.median(r["tokens"] / r["seconds"] for r in runs) for side, runs in results.items()}
    print("generated tok/s (median of rounds): " + ", ".join(f"{side} {r:.1f}" for side, r in rate.items()))
    print(f"ratio cai / hand-written AsyncLLM chain: {rate['cai'] / rate['hand']:.3f}  (target >= 0.95)")
    if args.before:
        print(f"ratio cai / the batch engine before streaming: {rate['cai'] / rate['before']:.3f}")


if __name__ == "__main__":
    main()
