"""A trainer run under `accelerate launch`, each process appending the data indexes it reads to
RECORD.rank{N}: what the distributed test checks the shards and the resume against.

    accelerate launch ... launch_recorded.py KIND CONFIG RECORD STOP_AFTER   (STOP_AFTER 0: run to the end)
"""

from __future__ import annotations

import importlib
import json
import sys

from cai.train import config as train_config
from cai.train import data


def main() -> None:
    kind, config_path, record, stop_after = sys.argv[1:5]
    read = data.Batches.__call__

    def recorded(batches: data.Batches, position: int) -> list[int]:
        indexes = read(batches, position)
        with open(f"{record}.rank{batches.rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps({"position": position, "indexes": indexes}) + "\n")
        return indexes

    data.Batches.__call__ = recorded
    trainer = importlib.import_module(train_config.RECIPES[kind])
    trainer.train(train_config.load(kind, config_path), stop_after=int(stop_after) or None)


if __name__ == "__main__":
    main()
