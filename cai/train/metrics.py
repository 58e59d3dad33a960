"""Training metrics: one JSON line per step and split in OUTPUT/metrics.jsonl (tensorboard too when
asked), and OUTPUT/curves.png at the end."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from cai.store import read_jsonl, write_atomic


class MetricsLog:
    """Appends `{"step", "split", ...}` lines. A resumed run first drops the lines past its checkpoint
    (a killed run may have logged steps it never saved), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, tensorboard_dir: Path | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only the main process writes
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(path) if r["step"] <= resume_step] if path.exists() else []
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def plot(metrics_path: Path, png_path: Path) -> None:
    """One panel per metric, train and eval curves against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for record in read_jsonl(metrics_path):
        for key, value in record.items():
            if key in ("step", "split") or not isinstance(value, (int, float)):
                continue
            xs, ys = series[key].setdefault(record["split"], ([], []))
            xs.append(record["step"])
            ys.append(value)
    names = sorted(series)
    if not names:
        return
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def mean(records: list[dict[str, float]]) -> dict[str, Any]:
    """Per-key mean over micro-batches (or eval batches)."""
    keys = records[0].keys() if records else ()
    return {k: sum(r[k] for r in records) / len(records) for k in keys}
