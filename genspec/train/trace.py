"""Step traces: the losses and states named in `train.trace`, recorded at every step.

The values stay on the device during an epoch and are read back once at its end (no host
sync per step). Each epoch appends its rows to `trace.csv` and a summary (mean, min, max,
last) to the epoch's record in metrics.jsonl; `trace.png` plots the summaries per epoch.
`collapse_flags` is BEGAN's indicator of mode collapse: a sudden fall of the equilibrium k.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from genspec.train.hooks import TRACING, Hook, register_hook

TRACE_FILE = "trace.csv"


def trace_keys(spec) -> list[tuple[str, str]]:
    """(name, key in a step's output) for each traced name: losses by name, states as state/NAME."""
    return [(name, f"state/{name}" if name in spec.states else name) for name in spec.train.get("trace", [])]


class StepTrace:
    """Collects one row per step for an epoch; `flush` writes them and returns the summary. With
    `replicas` K (a stacked run, genspec/experiments/stack.py) each value is a (K,) tensor, one per replica,
    and `flush_replicas` writes each replica's rows into its own folder."""

    def __init__(self, keys: list[tuple[str, str]], device, replicas: int | None = None):
        import torch  # torch-free import of this module: `genspec show` reads plot code beside it

        self.torch = torch
        self.keys = keys
        self.shape = () if replicas is None else (replicas,)
        self.rows: list = []
        self.steps: list[int] = []
        self.missing = torch.tensor(math.nan, device=device).expand(self.shape)

    def record(self, step: int, values: dict) -> None:
        if self.keys:
            self.rows.append(self.torch.stack([values[key].float().reshape(self.shape) if key in values else self.missing
                                               for _, key in self.keys]))
            self.steps.append(step)

    def flush(self, out: Path, epoch: int) -> dict:
        """Write the epoch's rows to out/trace.csv; returns the summary of each traced name."""
        steps, table = self._read_back()
        return {} if table is None else self._write(out, epoch, steps, table)

    def flush_replicas(self, outs: list[Path], epoch: int) -> list[dict]:
        """A stacked run's `flush`: replica r's rows go to outs[r]; one read-back for all."""
        steps, table = self._read_back()
        return [{} if table is None else self._write(out, epoch, steps, table[:, :, r]) for r, out in enumerate(outs)]

    def _read_back(self):
        """The epoch's steps and rows (steps x names [x replicas], on the CPU), and a fresh start."""
        if not self.keys or not self.rows:
            return self.steps, None
        steps, table = self.steps, self.torch.stack(self.rows).cpu()  # the one read-back of the epoch
        self.rows, self.steps = [], []
        return steps, table

    def _write(self, out: Path, epoch: int, steps: list[int], table) -> dict:
        torch = self.torch
        path = out / TRACE_FILE
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch"] + [name for name, _ in self.keys])
            for step, row in zip(steps, table.tolist()):
                writer.writerow([step, epoch] + [f"{v:.6g}" for v in row])
        summary = {}
        for j, (name, _) in enumerate(self.keys):
            column = table[:, j]
            column = column[torch.isfinite(column)]
            if len(column):
                summary[name] = {"mean": float(column.mean()), "min": float(column.min()), "max": float(column.max()),
                                 "last": float(column[-1])}
        return summary


def truncate(out: Path, last_epoch: int) -> None:
    """Drop rows of epochs after `last_epoch` (a resume redoes them)."""
    path = out / TRACE_FILE
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[1]) <= last_epoch]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    tmp.replace(path)


def collapse_flags(history: list, state: str, fall: float, window: int) -> list[dict]:
    """Epochs where the state's mean fell below (1 - fall) x its highest mean over the `window`
    epochs before: the first epoch of each such fall (BEGAN v3 reads a sudden fall of k as mode
    collapse; a k that never rose above zero is not flagged)."""
    series = [(h["epoch"], h["trace"][state]["mean"]) for h in history if state in h.get("trace", {})]
    flags, falling = [], False
    for i, (epoch, value) in enumerate(series):
        before = series[max(0, i - window):i]
        if not before:
            continue
        peak_epoch, peak = max(before, key=lambda item: item[1])
        fell = peak > 0 and value < (1 - fall) * peak
        if fell and not falling:
            flags.append({"epoch": epoch, "value": value, "peak": peak, "peak_epoch": peak_epoch})
        falling = fell
    return flags


def plot_trace(history: list, names: list[str], path: Path, flags: list[dict] | None = None) -> bool:
    """Per-epoch mean of each traced name with its min-max band; flagged epochs in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if any(n in h.get("trace", {}) for h in history)]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [(h["epoch"], h["trace"][name]) for h in history if name in h.get("trace", {})]
        epochs = [e for e, _ in rows]
        ax.fill_between(epochs, [s["min"] for _, s in rows], [s["max"] for _, s in rows], alpha=0.25, label="min-max of steps")
        ax.plot(epochs, [s["mean"] for _, s in rows], marker=".", label="mean")
        for flag in flags or []:
            ax.axvline(flag["epoch"], color="red", linestyle="--", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@register_hook("trace", order=TRACING)
class TraceHook(Hook):
    """`train.trace`: records the named losses and states at every step, writes them to
    trace.csv and a summary into each epoch's record. A resumed run first drops the rows of
    the epochs it redoes."""

    def __init__(self, keys, device):
        self.trace = StepTrace(keys, device)

    @classmethod
    def attach(cls, run):
        return cls(trace_keys(run.spec), run.model.device) if run.world.main and run.spec.train.get("trace") else None

    def run_start(self, run) -> None:
        if run.resumed:
            truncate(run.out, run.start_epoch - 1)

    def step_end(self, run, step: int, losses: dict) -> None:
        self.trace.record(step, losses)

    def epoch_end(self, run, record: dict) -> None:
        summary = self.trace.flush(run.out, record["epoch"])
        if summary:
            record["trace"] = summary
