"""`genspec tune`: Bayesian optimisation of spec params with Ax (the `ax.Client` API).

Each trial is a full run with the params overridden, in `<out>/trial_NNN/` (with its own
TensorBoard / MLflow run); the tuning logs each trial's objective as `tune/objective` (step: the
trial's index) in `<out>/tensorboard/` and its own MLflow run. The Ax client is
saved after every trial, so `--resume` continues without redoing finished trials. With
`--parallel K` (K > 1) K trials run at once, each in its own spawned worker process; a trial is
completed in Ax as soon as it finishes and a new one is asked for in its place. The default
strategy is the VAE-GAN paper's: quasi-random (Sobol) initial trials, then a Gaussian process
with an RBF kernel and expected improvement. Ax and BoTorch are imported only here.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from genspec.errors import RunError, SpecError, plural
from genspec.graph.pipeline import load_spec
from genspec.report.run_report import REPORTED_ALIASES, flat_results

STRATEGIES = ("gp_ei", "fast", "quality", "random_search")
CLIENT_FILE = "ax_client.json"


@dataclass
class TuneSettings:
    params: dict  # name -> (low, high, log)
    metric: str
    minimize: bool
    initial: int
    total: int
    strategy: str = "gp_ei"
    overrides: list = field(default_factory=list)
    points: list = field(default_factory=list)  # the first trials' params, where the spec fixes them: [{name: value}]


def settings_from(spec_path: str, names: list[str], ranges: list, trials: int | None, initial: int | None,
                  metric: str | None, minimize: bool | None, strategy: str | None, overrides: list[str]) -> TuneSettings:
    """Merge the spec's `tune` section with the command line (the command line wins)."""
    spec = load_spec(spec_path, overrides)
    section = spec.raw.get("tune", {})
    given = list(names)
    names = names or [k for k in section if k not in ("objective", "trials", "strategy")]
    if not names:
        raise RunError("nothing to tune: give --param NAME or a tune section naming params")
    if ranges and len(ranges) != len(names):
        raise RunError(f"--range given {len(ranges)} time(s) for {len(names)} param(s): give one per --param, in order")
    params = {}
    for i, name in enumerate(names):
        if name not in spec.params:
            where = "--param" if name in given else "the tune section names"  # the user's words for it
            close = difflib.get_close_matches(name, list(spec.params), n=1)
            raise RunError(f"{where} {name}: the spec has no param {name!r} (params: {', '.join(spec.params) or 'none'})"
                           + (f"; did you mean {close[0]!r}?" if close else ""))
        entry = section.get(name, {})
        low, high = ranges[i] if ranges else entry.get("range", (None, None))
        if low is None or not low < high:
            raise RunError(f"param {name}: give a range LO < HI (--range LO HI, or tune.{name}.range)")
        params[name] = (float(low), float(high), bool(entry.get("log", False)))
    for flag, value in (("--trials", trials), ("--initial", initial)):
        if value is not None and value < 1:
            raise RunError(f"{flag} must be at least 1, got {value}")
    objective = section.get("objective", {})
    trial_section = section.get("trials", {})
    # the command line wins: --initial asks for quasi-random initial trials, --range for another
    # range, and either replaces the spec's points
    points = [] if initial is not None or ranges else _initial_points(section, params)
    settings = TuneSettings(
        params=params,
        metric=metric or objective.get("metric") or _default_metric(spec),
        minimize=objective.get("minimize", True) if minimize is None else minimize,
        initial=initial if initial is not None else trial_section.get("initial", len(points) or max(2, 2 * len(params))),
        total=trials if trials is not None else trial_section.get("total", 8),
        strategy=strategy or section.get("strategy", "gp_ei"),
        overrides=list(overrides),
        points=points,
    )
    if points and settings.total < len(points):
        raise RunError(f"{len(points)} given points (tune.NAME.points) but {settings.total} trials in all: "
                       f"ask for at least {len(points)}")
    settings.initial = max(settings.initial, len(points))  # the points are the first initial trials
    if settings.strategy not in STRATEGIES:
        raise RunError(f"unknown strategy {settings.strategy!r}; known: {', '.join(STRATEGIES)}")
    _check_metric(settings.metric, spec)
    if settings.initial > settings.total:
        settings.initial = settings.total
    return settings


def _check_metric(metric: str, spec) -> None:
    """Refuse, before the first trial trains, a metric no run of this spec can report: its test
    losses, accuracy where `evaluate.accuracy` asks for it; sample metrics (torch-fidelity's
    names and ours) only where the spec computes them, whose names are checked after a trial."""
    from genspec.measure.fidelity import requested

    losses = list(spec.evaluate.get("losses", spec.losses))
    known = losses + [f"{name}_best" for name in losses] + (["test_accuracy"] if spec.evaluate.get("accuracy") else [])
    if REPORTED_ALIASES.get(metric, metric) in known or metric in known:
        return
    if requested(spec.evaluate) or spec.evaluate.get("real"):
        return  # FID, IS, KID... or a classifier's real-data scores: named by what evaluate computes
    close = difflib.get_close_matches(metric, known, n=1)
    raise RunError(f"--metric {metric}: no run of this spec reports it; it reports {', '.join(known)}"
                   + (f" (did you mean {close[0]!r}?)" if close else ""))


def _initial_points(section: dict, params: dict) -> list[dict]:
    """`tune.NAME.points`: the values the first trials take, in order (the VAE-GAN paper's beta =
    1, 50, 100, 150 before the surrogate's first suggestion), one list per tuned param, of one length."""
    given = {name: section.get(name, {}).get("points") for name in params}
    given = {name: values for name, values in given.items() if values is not None}
    if not given:
        return []
    if len(given) != len(params) or len({len(v) for v in given.values()}) != 1:
        raise RunError("tune.NAME.points: give every tuned param a list of points, all of one length "
                       f"(given: {', '.join(f'{n} {len(v)}' for n, v in given.items()) or 'none'}; tuned: {', '.join(params)})")
    for name, values in given.items():
        low, high, _ = params[name]
        outside = [v for v in values if not low <= v <= high]
        if outside:
            raise RunError(f"tune.{name}.points: {outside[0]:g} is outside the range [{low:g}, {high:g}]")
    return [{name: float(values[i]) for name, values in given.items()} for i in range(len(next(iter(given.values()))))]


def _initial_text(settings: TuneSettings) -> str:
    given = len(settings.points)
    random = plural(settings.initial - given, "quasi-random initial trial")
    if not given:
        return random
    return f"{plural(given, 'initial trial')} at the given points" + (f" and {random}" if settings.initial > given else "")


def _default_metric(spec) -> str:
    if spec.evaluate.get("fid"):
        return "fid"
    return next(iter(spec.evaluate.get("losses", spec.losses)))


def _import_ax():
    warnings.filterwarnings("ignore", category=FutureWarning)  # linear_operator warns on import
    try:
        import ax
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RunError(f"tuning needs Ax: pip install ax-platform ({exc})") from None
    for name in ("ax", "ax.api.client", "ax.generation_strategy", "botorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return ax


def generation_strategy(settings: TuneSettings, seed: int):
    """Sobol initial trials, then GP (RBF kernel) + expected improvement, as in the VAE-GAN paper."""
    from ax.adapter.registry import Generators
    from ax.generation_strategy.generation_node import GenerationStep
    from ax.generation_strategy.generation_strategy import GenerationStrategy
    from ax.generators.torch.botorch_modular.surrogate import SurrogateSpec
    from ax.generators.torch.botorch_modular.utils import ModelConfig
    # LogEI: expected improvement computed in log space (same maximiser, stable numerics)
    from botorch.acquisition import qLogExpectedImprovement
    from botorch.models import SingleTaskGP
    from gpytorch.kernels import RBFKernel

    surrogate = SurrogateSpec(model_configs=[ModelConfig(botorch_model_class=SingleTaskGP, covar_module_class=RBFKernel)])
    return GenerationStrategy(name="sobol+gp_rbf_ei", nodes=[
        # counting every trial of the experiment: the given points (attached trials) are initial ones
        GenerationStep(generator=Generators.SOBOL, num_trials=settings.initial, min_trials_observed=1,
                       generator_kwargs={"seed": seed}, use_all_trials_in_exp=True),
        GenerationStep(generator=Generators.BOTORCH_MODULAR, num_trials=-1,
                       generator_kwargs={"surrogate_spec": surrogate, "botorch_acqf_class": qLogExpectedImprovement}),
    ])


def _new_client(settings: TuneSettings, name: str, seed: int):
    ax = _import_ax()
    client = ax.Client(random_seed=seed)
    client.configure_experiment(
        parameters=[ax.RangeParameterConfig(name=n, parameter_type="float", bounds=(lo, hi), scaling="log" if log else "linear")
                    for n, (lo, hi, log) in settings.params.items()], name=name)
    client.configure_optimization(objective=("-" if settings.minimize else "") + "objective")
    if settings.strategy == "gp_ei":
        client.set_generation_strategy(generation_strategy(settings, seed))
    else:
        client.configure_generation_strategy(method=settings.strategy, initialization_budget=settings.initial,
                                             initialization_random_seed=seed)
    for point in settings.points:  # `running` trials, which the loops run first, in order
        client.attach_trial(parameters=point)
    return client


def tune(spec_path: str, settings: TuneSettings, out: Path | None = None, resume: bool = False,
         overwrite: bool = False, progress: bool = True, parallel: int | str = 1, executor=None) -> dict:
    """Run the trials; returns {"best": ..., "trials": [...]} and writes the tune report.

    `parallel` trials run at once when it is more than 1, each in a spawned worker process (so a
    script that calls this needs the usual `if __name__ == "__main__":` guard), or with the slurm
    `executor` (genspec/experiments/cluster.py) each trial is a job, `parallel` at a time."""
    from genspec.train.guard import folder_lock

    parallel = parallel_count(parallel)
    base = load_spec(spec_path, settings.overrides)
    out = Path(out or Path("reports") / base.name / "tune")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a folder; choose another --out")
    with folder_lock(out, "tuning"):  # one tuning at a time in a folder
        try:
            return _tune(spec_path, settings, base, out, resume, overwrite, progress, parallel, executor)
        except KeyboardInterrupt as exc:
            from genspec.experiments.cluster import StillRunning

            jobs = f"; {exc}" if isinstance(exc, StillRunning) else ""  # submitted jobs that go on without us
            raise KeyboardInterrupt(f"interrupted; {out} keeps the finished trials, and --resume continues the "
                                    "tuning (trials that were running are run again)" + jobs + _replaced_note(out)) from None


def _tune(spec_path, settings: TuneSettings, base, out: Path, resume: bool, overwrite: bool, progress: bool,
          parallel: int, executor=None) -> dict:
    from genspec.train.folder import atomic_write_text
    from genspec.experiments.run import run

    client_file = out / CLIENT_FILE
    if resume:
        if not client_file.exists():
            raise RunError(f"nothing to resume in {out}: no {CLIENT_FILE}")
        _check_same_settings(settings, out)
        client = _load_client(client_file)
        table = _read_table(out)
        _catch_up(client, table)
    else:
        if _contents(out) and not overwrite:
            raise RunError(f"{out} already holds a tuning run; use --resume to continue it or --overwrite to replace it")
        _set_aside(out)
        client = _new_client(settings, base.name, base.train["seed"])
        table = []
        atomic_write_text(out / SETTINGS_FILE, json.dumps(_settings_record(settings), indent=2) + "\n")
    done = {row["trial"] for row in table if row["status"] in ("completed", "failed")}
    tracked = _start_tracking(base, settings, out, resume)
    # trials that were running when a previous session died are run again with their parameters
    pending = {i: dict(t.arm.parameters) for i, t in client._experiment.trials.items()
               if t.status.is_running and i not in done}
    if executor is not None:
        table = _tune_jobs(spec_path, settings, base, client, out, table, done, pending, parallel, executor, tracked)
    elif parallel > 1:
        table = _tune_parallel(spec_path, settings, base.train["device"], client, out, table, done, pending, parallel,
                               tracked)
    else:
        while len(done) < settings.total:
            if not pending:
                pending = client.get_next_trials(max_trials=1)
                _save_client(client, client_file)  # the trial is `running` in the saved client: --resume runs it again
            index = min(pending)  # in trial order: the given points first
            parameters = pending.pop(index)
            row = run_trial(spec_path, settings, index, parameters, out, run, progress)
            table = _record(client, client_file, out, settings, table, done, index, row, tracked)
    result = _finish(client, settings, table, out)
    tracked.close()
    _drop_replaced_tuning(out)  # the new tuning is complete: the one it replaced can go
    return result


SETTINGS_FILE = "settings.json"
# what --resume may change: ask for more trials
RESUMABLE_SETTINGS = {"total"}


def _settings_record(settings: TuneSettings) -> dict:
    return json.loads(json.dumps(settings.__dict__, default=list))  # tuples as lists, as read back


def _check_same_settings(settings: TuneSettings, out: Path) -> None:
    """--resume continues the tuning it finds only with the settings it was made with (beyond
    more trials): another metric, direction, range or --set would mix two tunings' results."""
    try:
        previous = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot resume: {out / SETTINGS_FILE} is missing or unreadable ({exc})") from None
    now = _settings_record(settings)
    previous.setdefault("points", [])  # a tuning from before points existed had none
    changed = [f"  {key}: {previous.get(key)!r} -> {now.get(key)!r}" for key in now
               if key not in RESUMABLE_SETTINGS and previous.get(key) != now.get(key)]
    if changed:
        raise RunError(f"cannot resume {out}: it was tuned with other settings (give the same --param, --range, "
                       "--metric, --set... or --overwrite to start afresh):\n" + "\n".join(changed))


def _load_client(client_file: Path):
    ax = _import_ax()
    try:
        return ax.Client.load_from_json_file(str(client_file))
    except Exception as exc:  # noqa: BLE001 - Ax raises many kinds on a damaged file; each means the same here
        raise RunError(f"cannot resume: {client_file} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                       "--overwrite starts the tuning afresh") from None


def _catch_up(client, table: list) -> None:
    """trials.csv is written before the client: a trial the table has finished and the saved
    client still has running (a kill between the two saves) is finished in the client now."""
    for row in table:
        trial = client._experiment.trials.get(row["trial"])
        if trial is None or not trial.status.is_running:
            continue
        if row["status"] == "completed":
            client.complete_trial(row["trial"], raw_data={"objective": row["value"]})
        elif row["status"] == "failed":
            client.mark_trial_failed(row["trial"])


def _contents(out: Path) -> list[Path]:
    from genspec.train.guard import LOCK_FILE

    return sorted(p for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []


def _set_aside(out: Path) -> None:
    """--overwrite: the old tuning moves to a hidden sibling until the new one finishes, so an
    interrupted new tuning leaves it. Where one already waits there, `out` holds an unfinished
    replacement of it, which goes."""
    import shutil

    from genspec.train.folder import replaced_path

    backup = replaced_path(out)
    if backup.exists():
        for path in _contents(out):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return
    if _contents(out):
        backup.mkdir()
        for path in _contents(out):  # entry by entry: the lock file stays, and with it the lock
            path.rename(backup / path.name)


def _drop_replaced_tuning(out: Path) -> None:
    import shutil

    from genspec.train.folder import replaced_path

    if replaced_path(out).exists():
        shutil.rmtree(replaced_path(out))


def _replaced_note(out: Path) -> str:
    from genspec.train.folder import replaced_path

    backup = replaced_path(out)
    return (f"; the tuning --overwrite was replacing is kept in {backup}: move its contents back into {out} to "
            "restore it" if backup.exists() else "")


def _save_client(client, client_file: Path) -> None:
    """Ax writes the file in place: a kill mid-write would leave it empty. Write beside it, then swap."""
    tmp = client_file.with_name(client_file.name + ".tmp")
    client.save_to_json_file(str(tmp))
    os.replace(tmp, client_file)


def _start_tracking(base, settings: TuneSettings, out: Path, resume: bool):
    """The tuning's own trackers (the spec's train.tracking), with its settings as params."""
    from genspec.report.tracking import open_tracking

    tracked = open_tracking(base.train.get("tracking", ()), out, base.name, resumed=resume)
    params = {"tune.metric": settings.metric, "tune.minimize": settings.minimize, "tune.strategy": settings.strategy,
              **{f"tune.range.{name}": f"[{low:g}, {high:g}]" + (" log" if log else "")
                 for name, (low, high, log) in settings.params.items()}}
    tracked.call("params", params)
    return tracked


def _record(client, client_file: Path, out: Path, settings, table: list, done: set, index: int, row: dict,
            tracked=None) -> list:
    """Tell Ax how a trial ended and save trials.csv, then the client (--resume starts from
    here; `_catch_up` mends a kill between the two); a completed trial's objective goes to the
    trackers. Returns the updated table."""
    if row["status"] == "completed":
        client.complete_trial(index, raw_data={"objective": row["value"]})
    else:
        client.mark_trial_failed(index)
    done.add(index)
    table = [r for r in table if r["trial"] != index] + [row]
    _write_table(out, table, settings)
    _save_client(client, client_file)
    if tracked is not None and row["status"] == "completed":
        tracked.call("scalars", {"tune/objective": row["value"]}, index)
    return table


def parallel_count(value) -> int:
    """`--parallel K`: a positive integer (the command line hands it over as text)."""
    try:
        count = int(str(value).strip()) if not isinstance(value, (bool, float)) else None
    except ValueError:
        count = None
    if count is None or count < 1:
        shown = str(value).strip() or repr(value)
        raise RunError(f"--parallel must be a positive integer (trials run at once), got {shown}")
    return count


def _tune_parallel(spec_path, settings: TuneSettings, device: str, client, out: Path, table: list, done: set,
                   pending: dict, workers: int, tracked=None) -> list:
    """Keep `workers` trials running, each in a spawned worker process; record each as it finishes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from ax.exceptions.core import DataRequiredError

    client_file = out / CLIENT_FILE
    devices = trial_devices(device, _cuda_count(), workers)  # one per slot; None: the spec's own device
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(worker_threads(workers),))
    running: dict = {}  # future -> (trial index, slot)
    free = list(range(workers))
    try:
        while len(done) < settings.total:
            wanted = min(len(free), settings.total - len(done) - len(running))
            if wanted > 0 and not pending:
                try:
                    pending = client.get_next_trials(max_trials=wanted)
                except DataRequiredError:  # e.g. quasi-random trials used up, none observed yet: wait for one
                    if not running:
                        raise
                if pending:  # the new trials are `running` in the saved client: --resume runs them again
                    _save_client(client, client_file)
            while free and pending and len(done) + len(running) < settings.total:
                index = min(pending)
                slot = free.pop(0)
                future = executor.submit(_trial_in_worker, spec_path, settings, index, dict(pending.pop(index)), out,
                                         devices[slot])
                running[future] = (index, slot)
            if not running:
                raise RunError(f"Ax proposed no new trial after {len(done)} of {settings.total}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: running[f][0]):
                index, slot = running.pop(future)
                free.append(slot)
                free.sort()
                try:
                    row = future.result()
                except BrokenProcessPool:
                    raise RunError(f"the worker process running trial {index} stopped unexpectedly; finished trials "
                                   "are saved, and --resume runs the others again") from None
                table = _record(client, client_file, out, settings, table, done, index, row, tracked)
    except BaseException:
        _stop_workers(executor)  # an interrupt or a failure: the trials still running are dropped
        raise
    executor.shutdown(wait=False)  # every trial is in: the idle workers exit while the report is written
    return table


def _tune_jobs(spec_path, settings: TuneSettings, base, client, out: Path, table: list, done: set, pending: dict,
               slots: int, executor, tracked=None) -> list:
    """Each trial a job of the slurm executor, `slots` at a time; each is recorded as it ends,
    and Ax is asked for the next trial in its place, as `_tune_parallel` does with processes."""
    from ax.exceptions.core import DataRequiredError

    from genspec.experiments.cluster import StillRunning

    client_file = out / CLIENT_FILE
    running: list = []  # (job, trial index, parameters)
    try:
        while len(done) < settings.total:
            wanted = min(slots - len(running), settings.total - len(done) - len(running))
            if wanted > 0 and not pending:
                try:
                    pending = client.get_next_trials(max_trials=wanted)
                except DataRequiredError:  # quasi-random trials used up, none observed yet: wait for one
                    if not running:
                        raise
                if pending:  # `running` in the saved client: --resume runs them again
                    _save_client(client, client_file)
            while len(running) < slots and pending and len(done) + len(running) < settings.total:
                index = min(pending)
                parameters = dict(pending.pop(index))
                job = executor.submit_trial(_trial_in_job, spec_path, settings, index, parameters, out, base.name,
                                            base.raw.get("cluster"))
                running.append((job, index, parameters))
            if not running:
                raise RunError(f"Ax proposed no new trial after {len(done)} of {settings.total}")
            job = executor.wait_first([job for job, _, _ in running])
            _, index, parameters = next(entry for entry in running if entry[0] is job)
            running = [entry for entry in running if entry[0] is not job]
            row, problem = executor.outcome(job)
            if problem is not None:  # the job ended without a row (killed, out of memory): a failed trial
                row = {**_row_start(index, parameters), "status": "failed", "value": float("nan"), "note": problem[:200]}
            print(outcome_line(settings, row), file=sys.stderr, flush=True)
            table = _record(client, client_file, out, settings, table, done, index, row, tracked)
    except KeyboardInterrupt:
        if not running:
            raise
        ids = " ".join(job.job_id for job, _, _ in running)
        raise StillRunning(f"the jobs of the trials still running go on (scancel {ids} stops them)") from None
    return table


def _trial_in_job(spec_path, settings: TuneSettings, index: int, parameters: dict, out: Path, progress: bool,
                  resume: bool) -> dict:
    """A trial in a SLURM job (genspec/experiments/jobs.py), on the job's device; `resume`: the
    job was requeued after a preemption."""
    from genspec.experiments.run import run

    return run_trial(spec_path, settings, index, parameters, out, run, progress, resume)


def _init_worker(threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    from genspec.train.guard import exit_with_parent

    exit_with_parent()  # a tuning killed outright (no Ctrl-C to handle) takes its workers with it
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(threads)


def _trial_in_worker(spec_path, settings: TuneSettings, index: int, parameters: dict, out: Path, device) -> dict:
    from dataclasses import replace

    from genspec.experiments.run import run

    if device:
        settings = replace(settings, overrides=[*settings.overrides, f"train.device={device}"])
    # no progress bars: several workers share the terminal; each epoch prints a line instead
    return run_trial(spec_path, settings, index, parameters, out, run, progress=False)


def _stop_workers(executor) -> None:
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Torch threads per worker, so that `workers` workers together use the cores once."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // workers)


def trial_devices(device: str, cuda_devices: int, workers: int) -> list:
    """The device override of each worker slot: round-robin `cuda:i` when several CUDA devices exist
    and the spec would train on CUDA (`auto` or `cuda`); otherwise None (the spec's own device)."""
    if cuda_devices >= 2 and device in ("auto", "cuda"):
        return [f"cuda:{slot % cuda_devices}" for slot in range(workers)]
    return [None] * workers


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_trial(spec_path, settings: TuneSettings, index: int, parameters: dict, out: Path, run, progress: bool,
               resume: bool = False) -> dict:
    overrides = settings.overrides + [f"params.{k}={v!r}" for k, v in parameters.items()]
    folder = out / f"trial_{index:03d}"
    row = _row_start(index, parameters)
    print(f"tune: trial {index} " + ", ".join(f"{k}={v:.5g}" for k, v in parameters.items()), file=sys.stderr, flush=True)
    try:
        metrics = _trial_run(load_spec(spec_path, overrides), folder, run, progress, resume)
        results = flat_results(metrics)
        key = REPORTED_ALIASES.get(settings.metric, settings.metric)
        if key not in results:
            raise RunError(f"the run has no metric {settings.metric!r}; it has {', '.join(results)}")
        value = float(results[key])
        if not math.isfinite(value):
            raise RunError(f"{settings.metric} is {value}")
        row.update(status="completed", value=value, note="")
    except (RunError, SpecError) as exc:
        row.update(status="failed", value=float("nan"), note=str(exc).splitlines()[0][:200])
    print(outcome_line(settings, row), file=sys.stderr, flush=True)
    return row


def outcome_line(settings: TuneSettings, row: dict) -> str:
    outcome = f"{settings.metric} = {row['value']:.5g}" if row["status"] == "completed" else row["note"]
    return f"tune: trial {row['trial']} {row['status']}: {outcome}"


def _row_start(index: int, parameters: dict) -> dict:
    """The start of a trial's row of trials.csv: what it tried, where."""
    return {"trial": index, **{k: float(v) for k, v in parameters.items()}, "folder": f"trial_{index:03d}"}


def _trial_run(spec, folder: Path, run, progress: bool, resume: bool) -> dict:
    """A trial's run, afresh; with `resume` (a trial's SLURM job requeued after preemption,
    genspec/experiments/cluster.py) a trial that finished keeps its metrics and one that was
    stopped after a checkpoint goes on from it."""
    from genspec.train.folder import CHECKPOINT, finished_metrics

    if resume:
        metrics = finished_metrics(folder)
        if metrics is not None:
            return metrics
        if (folder / CHECKPOINT).exists():
            return run(spec, out=folder, resume=True, progress=progress)
    return run(spec, out=folder, overwrite=True, progress=progress)


def _columns(settings: TuneSettings) -> list[str]:
    return ["trial", *settings.params, "status", "value", "folder", "note"]


def _write_table(out: Path, table: list[dict], settings: TuneSettings) -> None:
    tmp = out / "trials.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(settings))
        writer.writeheader()
        for row in sorted(table, key=lambda r: r["trial"]):
            writer.writerow(row)
    tmp.replace(out / "trials.csv")


def _read_table(out: Path) -> list[dict]:
    path = out / "trials.csv"
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            parsed = {k: (float(v) if k not in ("status", "folder", "note", "trial") else v) for k, v in row.items()}
            parsed["trial"] = int(row["trial"])
            rows.append(parsed)
    return rows


def _finish(client, settings: TuneSettings, table: list[dict], out: Path) -> dict:
    completed = [r for r in table if r["status"] == "completed"]
    best = None
    if completed:
        pick = min if settings.minimize else max
        best = pick(completed, key=lambda r: r["value"])
    suggestion = _next_suggestion(client)
    picture = _plot(client, settings, table, suggestion, out)
    _write_markdown(settings, table, best, suggestion, picture, out)
    result = {"best": best, "trials": table, "suggestion": suggestion, "metric": settings.metric, "minimize": settings.minimize}
    from genspec.train.folder import atomic_write_text

    atomic_write_text(out / "tune.json", json.dumps(result, indent=2, default=str) + "\n")
    return result


def _next_suggestion(client) -> dict | None:
    """Where the acquisition would sample next (the paper's Figure 5 marks it); not run."""
    try:
        (index, parameters), = client.get_next_trials(max_trials=1).items()
        client.mark_trial_abandoned(index)
        return dict(parameters)
    except Exception:  # noqa: BLE001 - a suggestion is a nicety; the table and best point stand without it
        return None


def _plot(client, settings: TuneSettings, table: list[dict], suggestion, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(settings.params)
    if len(names) > 2:
        return None
    completed = [r for r in table if r["status"] == "completed"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len(names) == 1:
        name = names[0]
        lo, hi, log = settings.params[name]
        grid = np.geomspace(lo, hi, 120) if log else np.linspace(lo, hi, 120)
        prediction = _predict(client, [{name: float(v)} for v in grid])
        if prediction is not None:
            mean, sd = prediction
            ax.plot(grid, mean, color="C0", label="surrogate mean")
            ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.2, label="mean ± 2 sd")
        ax.scatter([r[name] for r in completed], [r["value"] for r in completed], color="k", zorder=3, label="observed")
        failed = [r for r in table if r["status"] == "failed"]
        for r in failed:
            ax.axvline(r[name], color="red", linestyle=":", alpha=0.6)
        if suggestion:
            ax.axvline(suggestion[name], color="C2", linestyle="--", label="next suggestion")
        ax.set_xlabel(name)
        ax.set_ylabel(settings.metric)
        if log:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        (a, b) = names
        ga = np.linspace(*settings.params[a][:2], 40)
        gb = np.linspace(*settings.params[b][:2], 40)
        points = [{a: float(x), b: float(y)} for y in gb for x in ga]
        prediction = _predict(client, points)
        if prediction is not None:
            contour = ax.contourf(ga, gb, prediction[0].reshape(len(gb), len(ga)), levels=20, cmap="viridis")
            fig.colorbar(contour, ax=ax, label=f"predicted {settings.metric}")
        ax.scatter([r[a] for r in completed], [r[b] for r in completed], color="w", edgecolor="k", label="observed")
        if suggestion:
            ax.scatter([suggestion[a]], [suggestion[b]], marker="*", s=150, color="C3", label="next suggestion")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.legend(fontsize=8)
    ax.set_title(f"tuning {', '.join(names)}: {settings.metric} ({'minimise' if settings.minimize else 'maximise'})")
    fig.tight_layout()
    fig.savefig(out / "tune.png", dpi=110)
    plt.close(fig)
    return "tune.png"


def _predict(client, points):
    import numpy as np

    try:
        predictions = client.predict(points)
    except Exception:  # noqa: BLE001 - no fitted surrogate yet (e.g. only quasi-random trials)
        return None
    mean = np.array([p["objective"][0] for p in predictions])
    sd = np.array([p["objective"][1] for p in predictions])
    return mean, np.nan_to_num(sd)


def _write_markdown(settings: TuneSettings, table: list[dict], best, suggestion, picture, out: Path) -> None:
    names = list(settings.params)
    lines = [f"# Tuning {', '.join(names)}", "",
             f"Objective: {'minimise' if settings.minimize else 'maximise'} `{settings.metric}`; strategy {settings.strategy} "
             f"({_initial_text(settings)}, {settings.total} in all). Ranges: "
             + ", ".join(f"{n} in [{lo:g}, {hi:g}]{' (log)' if log else ''}" for n, (lo, hi, log) in settings.params.items()), ""]
    if best:
        lines += ["Best: " + ", ".join(f"{n} = {best[n]:.5g}" for n in names) + f" with {settings.metric} = {best['value']:.5g} "
                  f"(trial {best['trial']}, [{best['folder']}]({best['folder']}/report.md))", ""]
    if suggestion:
        lines += ["Next suggestion of the acquisition: " + ", ".join(f"{n} = {v:.5g}" for n, v in suggestion.items()), ""]
    lines += ["| trial | " + " | ".join(names) + f" | status | {settings.metric} | note |", "|---" * (len(names) + 4) + "|"]
    for r in sorted(table, key=lambda r: r["trial"]):
        lines.append(f"| [{r['trial']}]({r['folder']}/report.md) | " + " | ".join(f"{r[n]:.5g}" for n in names)
                     + f" | {r['status']} | {r['value']:.5g} | {r.get('note', '')} |")
    if picture:
        lines += ["", f"![surrogate]({picture})"]
    (out / "tune.md").write_text("\n".join(lines) + "\n")
