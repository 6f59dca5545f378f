"""Studies: run every configuration of a sweep with `repeats` seeds, then lay the results out
as a paper's tables (mean and standard deviation per cell).

Each run goes to `<out>/<factor=level,...>/seed<N>/`. A finished run (one with metrics.json)
is skipped, an interrupted one (a checkpoint, no metrics.json) is resumed, so a study that
was stopped picks up where it was. The report is `study.md` plus one CSV per table.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from genspec.errors import RunError, plural
from genspec.lang.loader import Document
from genspec.graph.pipeline import check, load_runs, split_overrides
from genspec.lang.resolve import apply_overrides, resolve
from genspec.lang.spec import Spec
from genspec.lang.sweep import Run

DEFAULT_METRICS = ("test", "time_per_epoch_s", "trainable")


@dataclass
class StudyRun:
    run: Run
    spec: Spec
    seed: int
    folder: Path


def plan_study(path: str, overrides: list[str], only: list[str], out: Path | None) -> tuple[dict, list[StudyRun]]:
    """Every (configuration, seed) of a study with its folder; the study section of the spec."""
    doc = resolve(path, split_overrides(overrides)[0])
    section = {"repeats": doc.data.get("repeats", 1), **(doc.data.get("study") or {})}
    runs = load_runs(path, overrides, only)
    name = runs[0][1].name
    out = Path(out or Path("reports") / name)
    planned = []
    for run, spec in runs:
        for k in range(section["repeats"]):
            seed = spec.train["seed"] + k
            seeded = check(apply_overrides(Document(copy.deepcopy(run.doc.data), dict(run.doc.locations), run.doc.file),
                                           [f"train.seed={seed}"]))
            planned.append(StudyRun(run, seeded, seed, out / (run.id or "run") / f"seed{seed}"))
    order = {f: list(levels) for f, levels in (doc.data.get("sweep") or {}).items()}
    return {**section, "out": out, "name": name, "factors": list(runs[0][0].levels), "order": order}, planned


def run_study(path: str, overrides: list[str], only: list[str], out: Path | None, overwrite: bool = False,
              progress: bool = True, parallel: int = 1, stack: bool | None = None, executor=None) -> dict:
    """Train every planned run (skipping finished ones, resuming interrupted ones), `parallel` at
    a time in worker processes when asked, the seeds of a configuration as one stacked model where
    `stack_choice` says so (`stack` True / False: --stack / --no-stack; None: the spec's
    `study.stack`, by default auto), then write the study report. `executor` None trains here;
    the slurm executor (genspec/experiments/cluster.py) submits each run as a job of an array,
    at most `parallel` of them at once when it is more than 1."""
    if parallel < 1:
        raise RunError(f"--parallel must be a positive number of runs at once, got {parallel}")
    if executor is not None and stack:
        raise RunError("--stack trains a configuration's seeds in one process; with --executor slurm each run is "
                       "a job of its own")
    section, planned = plan_study(path, overrides, only, out)
    statuses = [run_status(item.folder) for item in planned]
    if not overwrite:
        statuses = _check_kept_runs(planned, statuses)
    todo, skipped = [], 0
    for i, (item, status) in enumerate(zip(planned, statuses), 1):
        label = f"[{i}/{len(planned)}] {item.run.id or item.spec.name} seed {item.seed}"
        if status == "finished" and not overwrite:
            print(f"study: {label}: finished earlier, skipped", file=sys.stderr, flush=True)
            skipped += 1
            continue
        # "started": stopped before its first checkpoint, so nothing in its folder is worth keeping
        todo.append((label + (" (resumed)" if status == "interrupted" else ""), item,
                     {"resume": status == "interrupted" and not overwrite, "overwrite": overwrite or status == "started"}))
    if executor is None:  # a job trains one run: the seeds of a study on a cluster are not stacked
        todo = _stacked_groups(todo, stack, section.get("stack", "auto"))
    try:
        if executor is not None:
            executor.train_study(todo, section["out"], section["name"], parallel)
        elif parallel == 1 or len(todo) <= 1:
            for label, what, options in todo:
                print(f"study: {label}", file=sys.stderr, flush=True)
                _train_entry(what, options, progress)
        else:
            _train_in_workers(todo, parallel)
    finally:
        _say_replaced(planned)
    done = sum(1 for item in planned if run_status(item.folder) == "finished") - skipped
    report = write_study_report(section, planned)
    print(f"study: {done} run(s) trained, {skipped} skipped; report in {report}", file=sys.stderr, flush=True)
    return {"runs": len(planned), "trained": done, "skipped": skipped, "report": str(report)}


def stack_choice(flag: bool | None, setting: str | bool, device_type: str) -> tuple[bool, str]:
    """Whether a study stacks each configuration's seeds, and why: the command line's --stack /
    --no-stack (`flag`) over the spec's `study.stack` (`setting`: auto, true, false); auto means
    on CUDA, where one stacked model keeps the device busy that one small run leaves mostly idle,
    and off on CPU, where one run at a time is the bit-exact reference and no idle device waits."""
    if flag is not None:
        return flag, "--stack" if flag else "--no-stack"
    if setting is not None and setting != "auto":
        return bool(setting), f"study.stack: {str(bool(setting)).lower()}"
    if device_type == "cuda":
        return True, "auto: CUDA"
    return False, f"auto: {device_type}; stacking is the default on CUDA only, --stack stacks here"


def _stacked_groups(todo: list, flag: bool | None, setting) -> list:
    """Where `stack_choice` says so, the new seeds of each configuration become one entry
    `(label, [StudyRun, ...], None)` to train together (genspec/experiments/stack.py); resumed runs, lone
    seeds, configurations that cannot stack and those the choice leaves unstacked stay entries
    `(label, StudyRun, options)` of their own."""
    from genspec.compiler.model import choose_device, fast_path

    groups: dict[str, list] = {}
    for entry in todo:
        groups.setdefault(entry[1].run.id, []).append(entry)
    left, said = [], set()
    for run_id, entries in groups.items():
        fresh = [e for e in entries if not e[2]["resume"]]
        if len(fresh) < 2:
            left += entries
            continue
        device = choose_device(fresh[0][1].spec.train["device"])
        on, why = stack_choice(flag, setting, device.type)
        if not on:
            if why not in said:  # said once for the study, not for every configuration
                print(f"study: each configuration's seeds one at a time ({why})", file=sys.stderr, flush=True)
                said.add(why)
            left += entries
            continue
        from genspec.experiments.stack import cannot_stack

        reason = cannot_stack(fresh[0][1].spec)
        if reason:
            print(f"study: {run_id or fresh[0][1].spec.name}: trained one seed at a time ({reason})", file=sys.stderr, flush=True)
            left += entries
            continue
        left += [e for e in entries if e[2]["resume"]]
        # the stacked step ignores bf16 autocast (see StackedRuns.step): say so where a run would use it
        precision = "; in float32, not bf16" if fast_path(fresh[0][1].spec.train, device).bf16 else ""
        left.append((f"{run_id or fresh[0][1].spec.name}: {len(fresh)} seeds as one stacked model ({why}{precision})", [item for _, item, _ in fresh], None))
    return left


def _train_entry(what, options: dict | None, progress: bool) -> None:
    """One entry of the study's to-do list: a run, or (options None) a stacked group of seeds."""
    if options is not None:
        _train(what.spec, what.folder, progress=progress, **options)
        return
    from contextlib import ExitStack

    from genspec.train.guard import folder_lock
    from genspec.experiments.stack import train_stacked
    from genspec.train.folder import clear_folder, drop_replaced

    with ExitStack() as locks:  # as run() does, one process at a time in each folder
        for item in what:
            locks.enter_context(folder_lock(item.folder))
        for item in what:  # new or started-only folders go; under --overwrite a finished run is moved aside
            clear_folder(item.folder, resume=False)
        train_stacked([item.spec for item in what], [item.folder for item in what], progress)
        for item in what:
            drop_replaced(item.folder)  # the new runs are complete


def _train(spec: Spec, folder: Path, resume: bool, overwrite: bool, progress: bool) -> None:
    from genspec.experiments.run import run

    run(spec, out=folder, resume=resume, overwrite=overwrite, progress=progress)


def _train_in_workers(todo: list, parallel: int) -> None:
    """Several small runs (or stacked groups of seeds) at once, one per worker process, each with
    its share of the CPU threads (on a GPU they share the device, which one small model leaves
    mostly idle, and each process's own kernel launches overlap the others'). Each run is the
    same computation as in a sequential study, in its own folder."""
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // parallel)
    runs = sum(1 if options is not None else len(what) for _, what, options in todo)
    jobs = f" in {len(todo)} job(s)" if runs != len(todo) else ""  # a stacked group of seeds is one job
    print(f"study: {runs} run(s){jobs}, {parallel} at a time, {threads} CPU thread(s) each", file=sys.stderr, flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
        running = {}
        for label, what, options in todo:
            items = what if options is None else [what]
            documents = [(item.spec.doc.data, dict(item.spec.doc.locations), item.spec.doc.file) for item in items]
            job = pool.submit(_worker, documents, [str(item.folder) for item in items], options, threads)
            running[job] = label
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in finished:
                label = running.pop(job)
                try:
                    job.result()
                except RunError as exc:
                    for other in running:
                        other.cancel()
                    raise RunError(f"{label}: {exc}") from None
                print(f"study: {label}: done", file=sys.stderr, flush=True)


def _worker(documents: list, folders: list, options: dict | None, threads: int) -> None:
    """A worker process's entry: the specs travel as plain documents and are checked again here."""
    import torch

    from genspec.train.guard import exit_with_parent

    exit_with_parent()  # a study killed outright takes its workers with it
    torch.set_num_threads(threads)
    items = [StudyRun(None, check(Document(*document)), None, Path(folder)) for document, folder in zip(documents, folders)]
    _train_entry(items if options is None else items[0], options, progress=False)


def _say_replaced(planned: list[StudyRun]) -> None:
    """Where runs that --overwrite was replacing still wait: their new runs did not finish."""
    from genspec.train.folder import replaced_path

    waiting = [path for path in (replaced_path(item.folder) for item in planned) if path.exists()]
    if waiting:
        print(f"study: {len(waiting)} run(s) that --overwrite was replacing are kept beside their folders, e.g. "
              f"{waiting[0]}: move its files back to restore it; a new run that finishes removes its own",
              file=sys.stderr, flush=True)


def _check_kept_runs(planned: list[StudyRun], statuses: list[str]) -> list[str]:
    """A finished or interrupted run is kept only if it was made from the spec it would be made
    from now: beyond what a resume may change (train.epochs and the like), any difference stops
    the study before it trains anything, naming the runs and the keys, rather than report old
    results as new ones. A finished run asked for more epochs is resumed for them."""
    from genspec.train.folder import describe_changes, spec_changes

    changed, fewer = [], []
    for i, (item, status) in enumerate(zip(planned, statuses)):
        if status not in ("finished", "interrupted"):
            continue
        differences = spec_changes(item.spec, item.folder)
        if differences:
            changed.append((item, differences))
            continue
        done = _epochs_done(item.folder)
        if status == "finished" and done < item.spec.train["epochs"]:
            statuses[i] = "interrupted"  # resumed to the new number of epochs
        elif done > item.spec.train["epochs"]:
            fewer.append((item, done))
    if changed:
        item, differences = changed[0]
        others = f" (and {len(changed) - 1} more run(s))" if len(changed) > 1 else ""
        raise RunError(f"{item.folder}{others} was made from a different spec than this study's; it differs in\n"
                       f"{describe_changes(differences)}\n"
                       "use --overwrite to retrain every run, or --out for a new study folder")
    if fewer:
        item, done = fewer[0]
        raise RunError(f"{item.folder} already has {done} epochs, more than the {item.spec.train['epochs']} asked; "
                       "use --overwrite to retrain, or --out for a new study folder")
    return statuses


def _epochs_done(folder: Path) -> int:
    """The last epoch a run folder recorded (metrics.jsonl)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


def run_status(folder: Path) -> str:
    """new, started (stopped before its first checkpoint), interrupted (a checkpoint) or finished."""
    from genspec.train.folder import finished_metrics

    if finished_metrics(folder) is not None:
        return "finished"
    if (folder / "checkpoint.pt").exists():
        return "interrupted"
    from genspec.train.folder import run_files

    return "started" if run_files(folder) else "new"


# ---------------------------------------------------------------- tables

def _axes(rows: list, columns: list) -> str:
    """How the tables are laid out, in words: a one-factor study has columns only."""
    parts = [f"{label} {' x '.join(factors)}" for label, factors in (("rows", rows), ("columns", columns)) if factors]
    return ", ".join(parts) or "one cell per table"


def metric_value(metrics: dict, key: str):
    """A dotted path into metrics.json; `trainable` / `frozen` sum the networks' parameter counts."""
    if key in ("trainable", "frozen"):
        return sum(net[key] for net in metrics.get("params", {}).values())
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _tables(section: dict, finished: list[tuple[StudyRun, dict]]) -> list[dict]:
    tables = section.get("tables")
    if tables:
        return tables
    keys = []
    for _, metrics in finished[:1]:
        keys += [f"test.{k}" for k in metrics.get("test", {})]
        keys += [f"fidelity.{k}" for k in metrics.get("fidelity", {})]
    keys += ["time_per_epoch_s", "trainable"]
    return [{"metric": k, "title": k} for k in keys]


def write_study_report(section: dict, planned: list[StudyRun]) -> Path:
    out: Path = section["out"]
    out.mkdir(parents=True, exist_ok=True)
    from genspec.train.folder import finished_metrics

    finished = [(item, metrics) for item in planned if (metrics := finished_metrics(item.folder)) is not None]
    factors = section["factors"]
    columns = section.get("columns") or factors[:1]
    rows = section.get("rows") or [f for f in factors if f not in columns]
    lines = [f"# Study {section['name']}", "",
             f"{len(finished)} of {len(planned)} runs finished; {plural(section['repeats'], 'seed')} per configuration. "
             f"Cells: mean (M) and standard deviation (Std) over the seeds; "
             f"{_axes(rows, columns)}.", ""]
    extractors = sorted({m.get("protocol", {}).get("extractor") for _, m in finished if m.get("protocol")})
    for table in _tables(section, finished):
        grid = _grid(finished, table["metric"], rows, columns)
        lines += _markdown_table(table, grid, rows, columns, section.get("order", {}))
        if table["metric"].startswith("fidelity.") and extractors:
            lines += [f"Feature extractor: {'; '.join(extractors)}.", ""]
        _write_csv(out / f"study_{_slug(table['metric'])}.csv", grid, rows, columns, table["metric"])
    lines += ["## Runs", "", "| run | seed | " + " | ".join(["report", "samples", "reconstructions", "interpolations"]) + " |",
              "|---|---|---|---|---|---|"]
    for item in planned:
        rel = item.folder.relative_to(out)
        links = [f"[{name}]({rel}/{file})" if (item.folder / file).exists() else "-" for name, file in
                 (("report", "report.md"), ("samples", "samples.png"), ("recon.", "reconstructions.png"),
                  ("interp.", "interpolations.png"))]
        lines.append(f"| {item.run.id or item.spec.name} | {item.seed} | " + " | ".join(links) + " |")
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _grid(finished, metric: str, rows: list, columns: list) -> dict:
    """{(row levels, column levels): [values over seeds]}"""
    grid: dict = {}
    for item, metrics in finished:
        value = metric_value(metrics, metric)
        key = (tuple(item.run.levels.get(f, "") for f in rows), tuple(item.run.levels.get(f, "") for f in columns))
        grid.setdefault(key, [])
        if value is not None:
            grid[key].append(float(value))
    return grid


def _stats(values: list) -> tuple:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _in_declared_order(keys: set, factors: list, order: dict) -> list:
    """Levels in the order the sweep declares them (L, PNL, NL, RKS), not alphabetically."""
    def rank(key):
        return [order.get(f, []).index(level) if level in order.get(f, []) else 0 for f, level in zip(factors, key)]
    return sorted(keys, key=rank)


def _markdown_table(table: dict, grid: dict, rows: list, columns: list, order: dict) -> list[str]:
    row_keys = _in_declared_order({k[0] for k in grid}, rows, order)
    col_keys = _in_declared_order({k[1] for k in grid}, columns, order)
    head = [*rows] + [f"{','.join(c)} M | {','.join(c)} Std" for c in col_keys]
    lines = [f"## {table.get('title', table['metric'])}", "", f"`{table['metric']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * (len(rows) + 2 * len(col_keys))]
    for r in row_keys:
        cells = []
        for c in col_keys:
            mean, std = _stats(grid.get((r, c), []))
            cells += [_fmt(mean), _fmt(std)]
        lines.append("| " + " | ".join([*r, *cells]) + " |")
    return lines + [""]


def _write_csv(path: Path, grid: dict, rows: list, columns: list, metric: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*rows, *columns, "metric", "mean", "std", "n"])
        for (r, c), values in sorted(grid.items(), key=lambda kv: [str(x) for x in kv[0][0] + kv[0][1]]):
            mean, std = _stats(values)
            writer.writerow([*r, *c, metric, mean, std, len(values)])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


__all__ = ["plan_study", "run_study", "write_study_report", "metric_value", "RunError"]
