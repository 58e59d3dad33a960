"""PPO rollouts from a vLLM engine that holds the policy's current weights, replaced after every update
without a restart.

The sync writes the policy's weights to one safetensors file (in /dev/shm where there is one) and asks
each engine worker to reload its weights from there in place (vLLM's `reload_weights`): only a folder
name crosses the process boundary, no pickled code. The prefix cache is reset, since cached keys and
values came from the old weights.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cai.core.seeding import derive_seed
from cai.generate.backends.local_vllm import engine_args, shutdown
from cai.train.runtime import full_weights


class VLLMRollout:
    def __init__(self, model_path: str, options: dict[str, Any], max_model_len: int):
        from vllm import LLM

        args = {**engine_args(options), "max_model_len": max_model_len}
        self.llm = LLM(model=model_path, **args)
        shm = Path("/dev/shm")
        self.folder = Path(tempfile.mkdtemp(prefix="cai-ppo-weights-", dir=shm if shm.is_dir() else None))

    def sync(self, policy) -> float:
        """Load the policy's weights into the engine; returns the seconds it took."""
        from safetensors.torch import save_file

        started = time.perf_counter()
        path = self.folder / "model.safetensors"
        save_file(full_weights(policy), str(path))
        # The workers' own in-place reload: it repacks weights the way the engine's kernels want them
        # (on CPUs, load_weights into the live model fails on parameters repacked at start).
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_path": str(self.folder), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def generate(
        self,
        prompts: list[list[int]],
        seed: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        logprobs: bool = False,
    ):
        """One sampled answer per prompt: its token ids (and the engine's log-prob of each when asked)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=derive_seed(seed, i),
                logprobs=0 if logprobs else None,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        answers = [list(out.outputs[0].token_ids) for out in outputs]
        if not logprobs:
            return answers
        scores = [
            [position[token].logprob for position, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
            for out in outputs
        ]
        return answers, scores

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        shutdown(self.llm)
        del self.llm
