"""Several trainings, one after another, in the processes of one `accelerate launch` (a launch costs
seconds of imports; a tiny model's training, less): each entry of PLAN is [KIND, CONFIG, STOP_AFTER]
(STOP_AFTER 0: run to the end, or on from its last checkpoint). Each output folder also gets, per
process N, reads.rank{N}.jsonl (the data indexes it read at each batch position) and
gathered.rank{N}.safetensors (the weights `runtime.full_weights` hands the vLLM sync there).

    accelerate launch ... launch_trainings.py PLAN.json [--fsdp-on-cpu]

accelerate offers FSDP on accelerators only: on a CPU its state falls back to plain multi-process
(MULTI_CPU) even under an FSDP config. `--fsdp-on-cpu` lifts that one check, so the FSDP code paths
(FSDP2's fully_shard over gloo, DTensor weights, sharded save_state/load_state, full state-dict
gathering) run here as they would on GPUs.
"""

from __future__ import annotations

import importlib
import json
import sys

from cai.train import checkpoint, data, runtime
from cai.train import config as train_config

OUTPUT = {}  # the output folder of the training under way


def fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # AcceleratorState() copies PartialState's type again on every later call
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = with_fsdp


def record_gathered_weights() -> None:
    from safetensors.torch import save_file

    save_final = checkpoint.save_final

    def saved(accelerator, model, tokenizer, output_dir):
        weights = runtime.full_weights(accelerator.unwrap_model(model))  # a collective: every process
        save_file(weights, str(output_dir / f"gathered.rank{accelerator.process_index}.safetensors"))
        return save_final(accelerator, model, tokenizer, output_dir)

    checkpoint.save_final = saved


def record_reads() -> None:
    read = data.Batches.__call__

    def recorded(batches: data.Batches, position: int) -> list[int]:
        indexes = read(batches, position)
        with open(OUTPUT["folder"] / f"reads.rank{batches.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"position": position, "indexes": indexes}) + "\n")
        return indexes

    data.Batches.__call__ = recorded


def main() -> None:
    if "--fsdp-on-cpu" in sys.argv:
        fsdp_on_cpu()
    record_gathered_weights()
    record_reads()
    for kind, path, stop_after in json.loads(open(sys.argv[1]).read()):
        trainer = importlib.import_module(train_config.RECIPES[kind])
        config = train_config.load(kind, path)
        OUTPUT["folder"] = config.output_dir
        config.output_dir.mkdir(parents=True, exist_ok=True)
        trainer.train(config, stop_after=stop_after or None)


if __name__ == "__main__":
    main()
