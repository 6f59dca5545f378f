"""The jobs of `--executor slurm` (genspec/experiments/cluster.py submits them): what each
receives (an order: plain, picklable data) and what it does (train one run folder).

The job callables derive from submitit's `Checkpointable`: when SLURM preempts a job or its time
runs out, submitit calls the job's `checkpoint` with the job's arguments and requeues what it
returns. Here that is the same call with its order marked requeued, which continues from
genspec's own checkpoint of the run (`checkpoint.pt`, written every `train.checkpoint_every`
epochs) rather than starting over, so a preemption costs at most the epochs since then.

Importing this module needs submitit (`pip install -e '.[slurm]'`); cluster.py checks first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from submitit.helpers import Checkpointable, DelayedSubmission

from genspec.errors import RunError, SpecError


class TrainRun(Checkpointable):
    """One run of a study (a configuration and a seed) in its run folder; returns
    {"folder", "metrics"} or, where genspec refused or stopped the run, {"folder", "error"}."""

    def __call__(self, order: "RunOrder") -> dict:
        return train_run(order)

    def checkpoint(self, order: "RunOrder") -> DelayedSubmission:
        return DelayedSubmission(self, order.requeued_order())


class TrainTrial(Checkpointable):
    """One trial of a tuning in `<out>/trial_NNN/`; returns its row of trials.csv, which the
    submitting process records in Ax as a local trial's."""

    def __call__(self, order: "TrialOrder") -> dict:
        return order.task(order.spec_path, order.settings, order.index, order.parameters, Path(order.out),
                          progress=False, resume=order.resume)

    def checkpoint(self, order: "TrialOrder") -> DelayedSubmission:
        return DelayedSubmission(self, order.requeued_order())


# ---------------------------------------------------------------- a study's runs

@dataclass(frozen=True)
class RunOrder:
    """One run of a study, as its job receives it: its spec as a plain document (checked again
    where the job runs), its folder, how to start it (the study's choice: resume an interrupted
    run, or start afresh), whether that replaces a run already there (--overwrite), and whether
    the job was requeued after a preemption or timeout."""
    document: tuple  # (data, locations, file) of genspec.lang.loader.Document
    folder: str
    resume: bool
    overwrite: bool
    replacing: bool = False
    requeued: bool = False

    @classmethod
    def of(cls, item, options: dict) -> "RunOrder":
        """The order of a study's planned run (a StudyRun) with the study's options for it."""
        import os

        from genspec.experiments.study import run_status

        doc = item.spec.doc
        folder = Path(os.path.abspath(item.folder))  # the job may start in another directory
        return cls((doc.data, dict(doc.locations), doc.file), str(folder), options["resume"], options["overwrite"],
                   replacing=options["overwrite"] and run_status(folder) in ("finished", "interrupted"))

    def requeued_order(self) -> "RunOrder":
        return replace(self, requeued=True)


def train_run(order: RunOrder) -> dict:
    """Train a study's run in its folder: {"folder", "metrics"}, or {"folder", "error"} with
    genspec's one-line message where the run was refused or stopped."""
    from genspec.experiments.run import run
    from genspec.graph.pipeline import check
    from genspec.lang.loader import Document

    folder = Path(order.folder)
    try:
        start = _start_of(order, folder)
        if "metrics" in start:
            return {"folder": str(folder), "metrics": start["metrics"]}
        metrics = run(check(Document(*order.document)), out=folder, progress=False, **start)
    except (RunError, SpecError) as exc:
        return {"folder": str(folder), "error": str(exc).splitlines()[0]}
    return {"folder": str(folder), "metrics": metrics}


def _start_of(order: RunOrder, folder: Path) -> dict:
    """How a job starts its run: as the study said; requeued after a preemption, as the folder
    now stands: a run that finished keeps its metrics, one with a checkpoint goes on from it,
    any other starts afresh. Under --overwrite, while the old run has not been moved aside yet
    (or the new one finished and dropped it: the two cannot be told apart), it starts again."""
    from genspec.experiments.study import run_status
    from genspec.train.folder import finished_metrics, replaced_path

    if not order.requeued:
        return {"resume": order.resume, "overwrite": order.overwrite}
    status = run_status(folder)
    if order.replacing and not replaced_path(folder).exists() and status in ("finished", "interrupted"):
        return {"resume": False, "overwrite": True}
    if status == "finished":
        return {"metrics": finished_metrics(folder)}
    if status == "interrupted":
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": True}


# ---------------------------------------------------------------- a tuning's trials

@dataclass(frozen=True)
class TrialOrder:
    """One trial of a tuning, as its job receives it: the tuning's trial function (`task`,
    genspec.experiments.tune.run_trial, pickled by name) and its arguments; `resume`: the job
    was requeued after a preemption, and the trial goes on from its checkpoint."""
    task: Callable
    spec_path: str
    settings: object  # genspec.experiments.tune.TuneSettings
    index: int
    parameters: dict
    out: str
    resume: bool = False

    def requeued_order(self) -> "TrialOrder":
        return replace(self, resume=True)
