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
from dataclasses import dataclass, fields
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
        from genspec.experiments.jobs import RunOrder, TrainRun

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

    def submit_trial(self, task, spec_path: str, settings, index: int, parameters: dict, out: Path, name: str,
                     section: dict | None):
        """Trial `index` of a tuning as a job that calls `task` (the tuning's own trial function,
        genspec/experiments/tune.py), with the resources of the spec's `cluster:` section under
        the flags."""
        from genspec.experiments.jobs import TrainTrial, TrialOrder

        resources = self.resources(section)
        order = TrialOrder(task, os.path.abspath(spec_path), settings, index, dict(parameters), os.path.abspath(out))
        job = self.executor(out, resources, f"genspec-{name}-trial{index}").submit(TrainTrial(), order)
        print(f"tune: trial {index} submitted as job {job.job_id} ({resources.describe()})", file=sys.stderr,
              flush=True)
        return job

    def outcome(self, job) -> tuple[dict | None, str | None]:
        return _outcome(job)


def _outcome(job) -> tuple[dict | None, str | None]:
    """(the job's result, None), or (None, why it has none) where the job itself failed."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.result(), None
    except UncompletedJobError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1][:200] if lines else "no message"  # a traceback's last line says what went wrong
        return None, f"job {job.job_id} ended without a result ({last}; log: {job.paths.stderr})"


class StillRunning(KeyboardInterrupt):
    """An interrupt (Ctrl-C) of the submitting process while its jobs go on on the cluster; the
    message says which, and how to go on."""


def _left_running(running: list) -> str:
    ids = " ".join(job.job_id for _, job in running)
    return (f"interrupted; {plural(len(running), 'submitted job')} go on on the cluster (scancel {ids} stops them); "
            "when they have ended, running the study again skips the finished runs and resumes the others")
