"""Progress: a tqdm bar over the run's steps (on a terminal) and one line per epoch."""

from __future__ import annotations

import sys

from genspec.train.hooks import PROGRESS, Hook, TrainingRun, register_hook


@register_hook("progress", order=PROGRESS)
class ProgressHook(Hook):
    """The bar advances every step and shows the step's losses once per `train.log_every` steps
    (reading them waits for the device, so not every step); each epoch ends with a line of its
    train and test means."""

    def __init__(self):
        self.bar = None

    @classmethod
    def attach(cls, run: TrainingRun):
        return cls() if run.world.main else None

    def run_start(self, run: TrainingRun) -> None:
        if run.progress and sys.stderr.isatty():
            from tqdm import tqdm

            steps = run.steps_per_epoch
            self.bar = tqdm(total=run.epochs * steps, initial=(run.start_epoch - 1) * steps, desc=run.spec.name,
                            unit="step", dynamic_ncols=True)
        self.log_every = run.spec.train["log_every"]

    def step_end(self, run: TrainingRun, step: int, losses: dict) -> None:
        if self.bar is None:
            return
        if (step - (run.start_epoch - 1) * run.steps_per_epoch) % self.log_every == 0:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in losses.items() if "/" not in k}, refresh=False)
        self.bar.update(1)

    def epoch_end(self, run: TrainingRun, record: dict) -> None:
        test = ", ".join(f"{k} {v:.4g}" for k, v in record.get("test", {}).items())
        train = ", ".join(f"{k} {v:.4g}" for k, v in record["train"].items() if "/" not in k)
        line = f"{run.spec.name} epoch {record['epoch']}/{run.epochs} ({record['time_s']:.1f}s)  train: {train}  test: {test}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def run_end(self, run: TrainingRun) -> None:
        if self.bar is not None:
            self.bar.close()
