"""Progress: one line per epoch, and on a terminal a tqdm bar over the run's steps."""

from __future__ import annotations

import sys

from genspec.train.hooks import PROGRESS, Hook, TrainingRun, register_hook


@register_hook("progress", order=PROGRESS)
class EpochLines(Hook):
    """Each epoch ends with a line of its train and test means (on stderr). Where progress is on
    and stderr is a terminal, `ProgressBar` also draws a bar; without one, nothing listens to
    the steps (no per-step call)."""

    @classmethod
    def attach(cls, run: TrainingRun):
        if not run.world.main:
            return None
        return ProgressBar() if run.progress and sys.stderr.isatty() else cls()

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def epoch_end(self, run: TrainingRun, record: dict) -> None:
        test = ", ".join(f"{k} {v:.4g}" for k, v in record.get("test", {}).items())
        train = ", ".join(f"{k} {v:.4g}" for k, v in record["train"].items() if "/" not in k)
        self.write(f"{run.spec.name} epoch {record['epoch']}/{run.epochs} ({record['time_s']:.1f}s)  "
                   f"train: {train}  test: {test}")


class ProgressBar(EpochLines):
    """The bar advances every step and shows the step's losses once per `train.log_every` steps
    (reading them waits for the device, so not every step); epoch lines are written above it."""

    def run_start(self, run: TrainingRun) -> None:
        from tqdm import tqdm

        steps = run.steps_per_epoch
        self.log_every = run.spec.train["log_every"]
        self.first = (run.start_epoch - 1) * steps
        self.bar = tqdm(total=run.epochs * steps, initial=self.first, desc=run.spec.name, unit="step", dynamic_ncols=True)

    def step_end(self, run: TrainingRun, step: int, losses: dict) -> None:
        if (step - self.first) % self.log_every == 0:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in losses.items() if "/" not in k}, refresh=False)
        self.bar.update(1)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)  # above the bar, on the stream the bar draws on

    def run_end(self, run: TrainingRun) -> None:
        self.bar.close()
