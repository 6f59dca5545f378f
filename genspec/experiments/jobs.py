"""The callables that submitit runs as SLURM jobs (`--executor slurm`, genspec/experiments/cluster.py).

Each derives from submitit's `Checkpointable`: when SLURM preempts a job or its time runs out,
submitit calls the job's `checkpoint` with the job's arguments and requeues what it returns.
Here that is the same call marked `requeued`, which continues from genspec's own checkpoint of
the run (`checkpoint.pt`, written every `train.checkpoint_every` epochs) rather than starting
over, so a preemption costs at most the epochs since that checkpoint.

Importing this module needs submitit (`pip install -e '.[slurm]'`); cluster.py checks first.
"""

from __future__ import annotations

from submitit.helpers import Checkpointable, DelayedSubmission

from genspec.experiments.cluster import RunOrder, TrialOrder, train_run, train_trial


class TrainRun(Checkpointable):
    """One run of a study (a configuration and a seed) in its run folder; returns
    {"folder", "metrics"} or, where genspec refused or stopped the run, {"folder", "error"}."""

    def __call__(self, order: RunOrder) -> dict:
        return train_run(order)

    def checkpoint(self, order: RunOrder) -> DelayedSubmission:
        return DelayedSubmission(self, order.requeued_order())


class TrainTrial(Checkpointable):
    """One trial of a tuning in `<out>/trial_NNN/`; returns its row of trials.csv, which the
    submitting process records in Ax as a local trial's."""

    def __call__(self, order: TrialOrder) -> dict:
        return train_trial(order)

    def checkpoint(self, order: TrialOrder) -> DelayedSubmission:
        return DelayedSubmission(self, order.requeued_order())
