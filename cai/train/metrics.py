"""Training metrics: one JSON line per step and split in OUTPUT/metrics.jsonl (tensorboard too when
asked), and OUTPUT/curves.png at the end."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cai.core import logs
from cai.core.disk import read_jsonl, write_atomic, written_atomically

SHOWN = ("loss", "reward", "mean_reward", "accuracy", "win_rate", "kl")  # the figures the step line shows, when logged
PLAIN_EVERY_S = 10.0


class MetricsLog:
    """Appends `{"step", "split", ...}` lines. A resumed run first drops the lines past its checkpoint
    (a killed run may have logged steps it never saved), so the file reads as one uninterrupted run."""

    def __init__(
        self,
        path: Path,
        resume_step: int,
        tensorboard_dir: Path | None = None,
        enabled: bool = True,
        display: "StepLine | None" = None,
    ):
        self.path = path
        self.enabled = enabled  # only the main process writes
        self._tb = None
        self._display = display
        if not enabled:
            return
        kept = [r for r in read_jsonl(path) if r["step"] <= resume_step] if path.exists() else []
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)

    @classmethod
    def open(cls, config, acc, resume_step: int, total_steps: int) -> "MetricsLog":
        """A trainer's log: OUTPUT/metrics.jsonl (and tensorboard when asked), and the step line on the terminal."""
        output = config.output_dir
        return cls(
            output / "metrics.jsonl",
            resume_step,
            output / "tensorboard" if config.tensorboard else None,
            acc.is_main_process,
            StepLine(config.kind, resume_step, total_steps),
        )

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if split == "train" and self._display is not None:
            self._display.show(step, values)
        self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            if self._display is not None:
                self._display.close()
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class TerminalLine:
    """One line of progress on the terminal: rewritten in place on a terminal; piped output gets a
    plain line every few seconds and the last one."""

    def __init__(self):
        self._started = time.monotonic()
        self._printed = self._started
        self._stream = logs.terminal()
        self._live = self._stream.isatty()
        self._shown = False

    def write(self, line: str, last: bool = False) -> None:
        now = time.monotonic()
        if self._live:
            self._stream.write("\r" + line + "\x1b[K")
            self._stream.flush()
            self._shown = True
        elif now - self._printed >= PLAIN_EVERY_S or last:
            self._printed = now
            print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False


class StepLine(TerminalLine):
    """The terminal's view of a training: `kind step N/M, loss ..., s/step, ETA`."""

    def __init__(self, kind: str, resume_step: int, total_steps: int):
        super().__init__()
        self.kind, self.total, self._first = kind, total_steps, resume_step

    def show(self, step: int, values: dict[str, float]) -> None:
        per_step = (time.monotonic() - self._started) / max(step - self._first, 1)
        eta = per_step * (self.total - step)
        figures = ", ".join(f"{key} {values[key]:.4g}" for key in SHOWN if isinstance(values.get(key), (int, float)))
        line = f"{self.kind} step {step}/{self.total}, {figures}, {per_step:.2f} s/step, ETA {int(eta // 60)}:{int(eta % 60):02d}"
        self.write(line, last=step == self.total)


class PhaseLine(TerminalLine):
    """The terminal's view of a phase without optimizer steps (sampling K answers per prompt, scoring
    them): `what: done/total, elapsed, ETA`, so a long phase does not look like a hung process."""

    def __init__(self, what: str, total: int):
        super().__init__()
        self.what, self.total = what, total

    def show(self, done: int) -> None:
        elapsed = time.monotonic() - self._started
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = f"{self.what}: {done}/{self.total}, {int(elapsed)} s, ETA {int(eta // 60)}:{int(eta % 60):02d}"
        self.write(line, last=done == self.total)


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
    with written_atomically(png_path) as tmp:  # a kill mid-write leaves the last curves, not half a PNG
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def mean(records: list[dict[str, float]]) -> dict[str, Any]:
    """Per-key mean over micro-batches (or eval batches)."""
    keys = records[0].keys() if records else ()
    return {k: sum(r[k] for r in records) / len(records) for k in keys}
