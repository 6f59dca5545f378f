"""Where a study's runs and a tuning's trials train: `--executor local` (the default: in this
process, or `--parallel K` worker processes, genspec/experiments/study.py and tune.py) or
`--executor slurm`: each run (a configuration and a seed) or trial becomes a SLURM job through
submitit, the runs of a study as job arrays.

A job trains one run folder exactly as a local run does (genspec/experiments/run.py) and hands
back its metrics; the study's tables are then made from the run folders as for local runs, and a
trial's row goes into Ax as a local trial's. The jobs are submitit callables
(genspec/experiments/jobs.py) that a preempted or timed-out job resubmits as a resume of its run
from its last checkpoint. submitit keeps each job's files (its pickled call and result, its
stdout and stderr) in `<out>/slurm/<job id>/`, its own convention.

Each job asks for the resources of the spec's `cluster:` section (partition, time in minutes,
gpus, cpus, mem in GB), which the `--slurm-*` flags override. For tests and for trying it out,
the environment variable GENSPEC_SUBMITIT_CLUSTER picks submitit's `local` cluster (each job a
process on this machine) or `debug` (each job in this process) instead of `slurm`: the same code
path without a cluster.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from genspec.errors import RunError, plural
from genspec.lang.registry import CLUSTER_KEYS

EXECUTORS = ("local", "slurm")
SUBMITIT_CLUSTER = "GENSPEC_SUBMITIT_CLUSTER"
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
JOBS_FOLDER = "slurm"  # <out>/slurm/<job id>/: submitit's files of each job
LOCAL_TIMEOUT_MIN = 24 * 60  # submitit's local jobs are stopped after 2 minutes unless told otherwise
POLL_S = {"slurm": 15.0, "local": 0.5, "debug": 0.0}  # how often a finished job is looked for


@dataclass(frozen=True)
class Resources:
    """What each job asks SLURM for; None leaves it to the cluster's defaults."""
    partition: str | None = None
    time: int | None = None  # minutes
    gpus: int | None = None
    cpus: int | None = None
    mem: float | None = None  # GB

    def over(self, section: dict | None) -> "Resources":
        """These (the command line's) over a spec's `cluster:` section."""
        section = section or {}
        return Resources(**{f.name: section.get(f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                            for f in fields(self)})

    def describe(self) -> str:
        units = {"time": " min", "mem": " GB"}
        given = [f"{f.name} {getattr(self, f.name)}{units.get(f.name, '')}" for f in fields(self)
                 if getattr(self, f.name) is not None]
        return ", ".join(given) or "the cluster's default resources"


assert tuple(f.name for f in fields(Resources)) == CLUSTER_KEYS  # the section, the flags and this agree


def submitit_parameters(resources: Resources, name: str, parallel: int, cluster: str) -> dict:
    """`executor.update_parameters` of a job (or array) with these resources; `parallel` > 1
    caps how many jobs of an array run at once (`--parallel K`)."""
    parameters = {"name": name, "slurm_partition": resources.partition, "timeout_min": resources.time,
                  "gpus_per_node": resources.gpus, "cpus_per_task": resources.cpus, "mem_gb": resources.mem}
    if cluster == "local" and resources.time is None:
        parameters["timeout_min"] = LOCAL_TIMEOUT_MIN
    if parallel > 1:
        parameters["slurm_array_parallelism"] = parallel
    return {key: value for key, value in parameters.items() if value is not None}


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise RunError("--executor slurm needs submitit: pip install -e '.[slurm]'") from None
    return submitit


def executor_from(name: str, partition: str | None = None, time: int | None = None, gpus: int | None = None,
                  cpus: int | None = None, mem: float | None = None) -> "Slurm | None":
    """`--executor NAME` with its `--slurm-*` flags: None for local (the runs train here), else
    the Slurm executor. Checks everything before a run trains, submitit's presence included."""
    flags = Resources(partition, time, gpus, cpus, mem)
    given = [f"--slurm-{f.name}" for f in fields(flags) if getattr(flags, f.name) is not None]
    if name == "local":
        if given:
            raise RunError(f"{given[0]} sets the resources of SLURM jobs: add --executor slurm")
        return None
    if name not in EXECUTORS:
        raise RunError(f"--executor {name}: known executors: {', '.join(EXECUTORS)}")
    for flag, value, least in (("time", time, 1), ("gpus", gpus, 0), ("cpus", cpus, 1)):
        if value is not None and value < least:
            raise RunError(f"--slurm-{flag} must be at least {least}, got {value}")
    if mem is not None and not mem > 0:
        raise RunError(f"--slurm-mem must be a positive number of GB, got {mem:g}")
    cluster = os.environ.get(SUBMITIT_CLUSTER, "slurm")
    if cluster not in SUBMITIT_CLUSTERS:
        raise RunError(f"{SUBMITIT_CLUSTER}={cluster}: expected one of {', '.join(SUBMITIT_CLUSTERS)}")
    import_submitit()
    return Slurm(flags, cluster)


@dataclass(frozen=True)
class Slurm:
    """The slurm executor: `flags` (the command line's resources) over each spec's `cluster:`
    section; `cluster` is submitit's: slurm, or local / debug (see the module's docstring)."""
    flags: Resources
    cluster: str = "slurm"

    def resources(self, section: dict | None) -> Resources:
        return self.flags.over(section)

    def executor(self, out: Path, resources: Resources, name: str, parallel: int = 1):
        submitit = import_submitit()
        try:
            executor = submitit.AutoExecutor(folder=str(out / JOBS_FOLDER / "%j"), cluster=self.cluster)
        except RuntimeError as exc:  # no srun / sbatch on this machine
            raise RunError(f"--executor slurm: {exc} Submit from a machine of the cluster, or set "
                           f"{SUBMITIT_CLUSTER}=local to run the jobs here") from None
        executor.update_parameters(**submitit_parameters(resources, name, parallel, self.cluster))
        return executor

    def wait_first(self, jobs: list):
        """The first of `jobs` to end (finished, failed or cancelled)."""
        submitit = import_submitit()
        return next(submitit.helpers.as_completed(jobs, poll_frequency=POLL_S[self.cluster]))

    # ------------------------------------------------------------ studies

    def train_study(self, todo: list, out: Path, name: str, parallel: int) -> None:
        """Each entry (label, StudyRun, options) of a study's to-do list as one job; the runs that
        ask for the same resources go as one job array. Waits for every job, then raises a
        RunError naming those that failed (the finished runs stay, and a rerun skips them)."""
        from genspec.experiments.jobs import TrainRun

        if not todo:
            return
        groups: dict[Resources, list] = {}
        for label, item, options in todo:
            groups.setdefault(self.resources(item.spec.raw.get("cluster")), []).append((label, RunOrder.of(item, options)))
        submitted = []
        for resources, entries in groups.items():
            executor = self.executor(out, resources, f"genspec-{name}", parallel)
            jobs = executor.map_array(TrainRun(), [order for _, order in entries])
            where = f"array {jobs[0].job_id.split('_')[0]}" if self.cluster == "slurm" else f"submitit's {self.cluster} cluster"
            print(f"study: {plural(len(jobs), 'job')} submitted ({resources.describe()}; {where}); their logs in "
                  f"{out / JOBS_FOLDER}", file=sys.stderr, flush=True)
            submitted += [(label, job) for (label, _), job in zip(entries, jobs)]
        failures = self._wait_for_runs(submitted)
        if failures:
            others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise RunError(f"{failures[0]}{others}; the runs that finished are kept: run the study again to retry the others")

    def _wait_for_runs(self, submitted: list) -> list[str]:
        running, failures = list(submitted), []
        try:
            while running:
                job = self.wait_first([job for _, job in running])
                label = next(label for label, other in running if other is job)
                running = [(lab, other) for lab, other in running if other is not job]
                result, problem = _outcome(job)
                if problem is None and "error" in result:
                    problem = f"{result['error']} (log: {job.paths.stderr})"
                if problem is None:
                    print(f"study: {label}: done (job {job.job_id})", file=sys.stderr, flush=True)
                else:
                    print(f"study: {label}: failed: {problem}", file=sys.stderr, flush=True)
                    failures.append(f"{label}: {problem}")
        except KeyboardInterrupt:
            raise StillRunning(_left_running(running)) from None
        return failures

    # ------------------------------------------------------------ tuning

    def submit_trial(self, order: "TrialOrder", out: Path, name: str, section: dict | None):
        """A trial as a job with the resources of the spec's `cluster:` section under the flags."""
        from genspec.experiments.jobs import TrainTrial

        resources = self.resources(section)
        job = self.executor(out, resources, f"genspec-{name}-trial{order.index}").submit(TrainTrial(), order)
        print(f"tune: trial {order.index} submitted as job {job.job_id} ({resources.describe()})", file=sys.stderr,
              flush=True)
        return job

    def trial_row(self, job, order: "TrialOrder") -> dict:
        """A finished trial job's row of trials.csv; a job that ended without one (killed, out of
        memory) is a failed trial, as a trial whose run stopped is."""
        result, problem = _outcome(job)
        if problem is not None:
            result = {"trial": order.index, **{k: float(v) for k, v in order.parameters.items()},
                      "folder": f"trial_{order.index:03d}", "status": "failed", "value": float("nan"),
                      "note": problem[:200]}
        return result


def _outcome(job) -> tuple[dict | None, str | None]:
    """(the job's result, None), or (None, why it has none) where the job itself failed."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.result(), None
    except UncompletedJobError as exc:
        last = [line for line in str(exc).splitlines() if line.strip()]
        return None, f"job {job.job_id} ended without a result ({last[-1][:200] if last else 'no message'}; log: {job.paths.stderr})"


class StillRunning(KeyboardInterrupt):
    """An interrupt (Ctrl-C) of the submitting process while its jobs go on on the cluster; the
    message says which, and how to go on."""


def _left_running(running: list) -> str:
    ids = " ".join(job.job_id for _, job in running)
    return (f"interrupted; {plural(len(running), 'submitted job')} go on on the cluster (scancel {ids} stops them); "
            "when they have ended, running the study again skips the finished runs and resumes the others")


# ---------------------------------------------------------------- what a job does

@dataclass(frozen=True)
class RunOrder:
    """One run of a study, as a job receives it: its spec as a plain document (checked again
    where the job runs), its folder, how to start it (the study's choice: resume an interrupted
    run, start afresh), whether that replaces a run already there (--overwrite), and whether the
    job was requeued after a preemption or timeout."""
    document: tuple  # (data, locations, file) of genspec.lang.loader.Document
    folder: str
    resume: bool
    overwrite: bool
    replacing: bool = False
    requeued: bool = False

    @classmethod
    def of(cls, item, options: dict) -> "RunOrder":
        from genspec.experiments.study import run_status

        doc = item.spec.doc
        folder = Path(os.path.abspath(item.folder))  # the job may start in another directory
        return cls((doc.data, dict(doc.locations), doc.file), str(folder), options["resume"], options["overwrite"],
                   replacing=options["overwrite"] and run_status(folder) in ("finished", "interrupted"))

    def requeued_order(self) -> "RunOrder":
        return replace(self, requeued=True)


def train_run(order: RunOrder) -> dict:
    """Train a study's run in its folder (the body of a TrainRun job): {"folder", "metrics"},
    or {"folder", "error"} with genspec's one-line message where the run was refused or stopped."""
    from genspec.errors import SpecError
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


@dataclass(frozen=True)
class TrialOrder:
    """One trial of a tuning, as a job receives it; `resume`: requeued after a preemption."""
    spec_path: str
    settings: object  # genspec.experiments.tune.TuneSettings
    index: int
    parameters: dict
    out: str
    resume: bool = False

    def requeued_order(self) -> "TrialOrder":
        return replace(self, resume=True)


def train_trial(order: TrialOrder) -> dict:
    """Train a tuning's trial (the body of a TrainTrial job): its row of trials.csv."""
    from genspec.experiments.run import run
    from genspec.experiments.tune import run_trial

    return run_trial(order.spec_path, order.settings, order.index, order.parameters, Path(order.out), run,
                     progress=False, resume=order.resume)
