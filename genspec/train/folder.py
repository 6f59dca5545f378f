"""A run's folder: which files are the run's, what a resume may change, atomic writes, and
--overwrite that moves the old run aside until the new one has finished.

A run folder holds `spec.resolved.yaml` (the spec as run), `metrics.jsonl` (one record per
epoch), `checkpoint.pt`, and at the end the report, pictures and `metrics.json`, which is
written last and marks the run finished. Trackers add `tensorboard/` (event files) and
`tracking.json` (the MLflow run a resume continues). Nothing else in the folder (a user's notes, a
tuning's `tune/`, a study's report) is the run's to move or delete.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import sys
from pathlib import Path

import yaml

from genspec.errors import RunError
from genspec.lang.spec import Spec
from genspec.train.guard import LOCK_FILE

CHECKPOINT = "checkpoint.pt"


TENSORBOARD_DIR = "tensorboard"  # the run's TensorBoard event files (genspec/report/tracking.py)


TRACKING_FILE = "tracking.json"  # which MLflow run the folder's run logs to


RESOLVED = "spec.resolved.yaml"


FINAL_METRICS = "metrics.json"


# Keys allowed to differ when resuming: more epochs, or a different checkpoint cadence.
# How batches are fed (train.loader, train.workers) does not change them, so it may change too, and
# so may whether steps replay from CUDA graphs (the same kernels either way).
STUDY_ONLY = {("repeats",), ("study",), ("sweep",)}


# Where a run trains (the SLURM resources of `--executor slurm`) does not change it.
WHERE_IT_RUNS = {("cluster",)}


RESUMABLE_CHANGES = {("train", "epochs"), ("train", "checkpoint_every"), ("train", "log_every"), ("train", "tracking"),
                     ("train", "loader"), ("train", "workers"), ("train", "cuda_graphs"), ("train", "memory_budget")}
# What the spec says of its paper, with all beneath it (source.reported.fid): a corrected citation,
# a paper's number or a named reading changes nothing the run computes.
DESCRIPTION = {("source", "paper"), ("source", "table"), ("source", "url"), ("source", "notes"),
               ("source", "reading"), ("source", "reported")}


RUN_MARKERS = (RESOLVED, CHECKPOINT, "metrics.jsonl", "metrics.json")


STARTED_ONLY = {RESOLVED, "layers.md", ".genspec-files", TENSORBOARD_DIR, TRACKING_FILE}  # what a run writes before its first epoch ends


# A study of a spec reports in the spec's run folder (reports/<name>/) beside a run of it.
STUDY_FILES = ("study.md", "study_*.csv")


# The files a run writes, by name (a folder written before the manifest existed is known by
# these); grids with names of their own are in the manifest the run keeps.
MANIFEST = ".genspec-files"


KNOWN_RUN_FILES = ("spec.resolved.yaml", "layers.md", "metrics.jsonl", "metrics.json", "checkpoint.pt", "report.md",
                   "trace.csv", "trace.png", "losses.png", "graph.png", "labels.png", "samples.png",
                   "reconstructions.png", "interpolations.png", "*.tmp", MANIFEST, TRACKING_FILE)


# The folders a run writes: moved aside and removed with its files.
KNOWN_RUN_FOLDERS = (TENSORBOARD_DIR,)


def write_metrics(out: Path, metrics: dict) -> None:
    """metrics.json, atomically and last of a run's files: it marks the run finished (a study
    skips it, `load_run` reads it), so it must not be there before the report, nor half there."""
    atomic_write_text(out / FINAL_METRICS, metrics_text(metrics))


def finished_metrics(out: Path) -> dict | None:
    """A finished run's final metrics; None where the run has not finished, or its metrics.json
    is unreadable (damaged outside genspec: the run is then treated as unfinished, and resumed)."""
    try:
        metrics = json.loads((out / FINAL_METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def check_folder(spec: Spec, out: Path, resume: bool, overwrite: bool) -> None:
    has_run = bool(run_files(out))
    if has_run and not resume and stopped_before_first_epoch(out):
        print(f"genspec: {out} holds a run stopped before its first epoch ended (no checkpoint, no metrics); "
              "starting it afresh", file=sys.stderr)
        return
    if resume:
        if not (out / CHECKPOINT).exists():
            started = out.exists() and stopped_before_first_epoch(out)
            raise RunError(f"nothing to resume in {out}: no {CHECKPOINT} there"
                           + ("; it stopped before its first checkpoint: run it again without --resume to start afresh"
                              if started else ""))
        check_same_spec(spec, out)
    elif not has_run and other_files(out):
        raise RunError(f"{out} is not empty and is not a genspec run folder; choose another --out")
    elif has_run and not overwrite:
        raise RunError(f"{out} already holds a run; use --resume to continue it or --overwrite to replace it")


def run_files(out: Path) -> list[Path]:
    """What in `out` the run there wrote: the files its manifest names, genspec's own file
    names and its own folders (`tensorboard/`). Nothing else is the run's to move or delete: a user's notes beside it, a folder inside
    it (a tuning's `tune/`, a study's `<config>/seed<k>/`), a study's report."""
    if not out.is_dir():
        return []
    named = set(_manifest(out))
    files = [p for p in out.iterdir() if p.is_file() and not p.is_symlink() and p.name != LOCK_FILE
             and (p.name in named or any(fnmatch.fnmatch(p.name, pattern) for pattern in KNOWN_RUN_FILES))
             and not any(fnmatch.fnmatch(p.name, pattern) for pattern in STUDY_FILES)]
    folders = [out / name for name in KNOWN_RUN_FOLDERS if (out / name).is_dir() and not (out / name).is_symlink()]
    return sorted(files + folders)


def other_files(out: Path) -> list[Path]:
    """Plain files in `out` that no run wrote (and that are not a study's report)."""
    if not out.is_dir():
        return []
    own = set(run_files(out))
    return sorted(p for p in out.iterdir() if not p.is_dir() and p not in own and p.name != LOCK_FILE
                  and not any(fnmatch.fnmatch(p.name, pattern) for pattern in STUDY_FILES))


def _manifest(out: Path) -> list[str]:
    try:
        names = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and "/" not in n] if isinstance(names, list) else []


def write_manifest(out: Path, names) -> None:
    """Record the files this run wrote (beside those already recorded), so --overwrite later
    replaces exactly them."""
    present = {p.name for p in out.iterdir() if p.is_file()} if out.is_dir() else set()
    written = sorted((set(_manifest(out)) | set(names) | {MANIFEST}) & (present | {MANIFEST}))
    atomic_write_text(out / MANIFEST, json.dumps(written) + "\n")


def stopped_before_first_epoch(out: Path) -> bool:
    """A genspec run folder holding only what a run writes before its first epoch ends: nothing
    in it is worth keeping, so running the spec again needs no --overwrite."""
    names = {p.name for p in run_files(out)}
    return RESOLVED in names and names <= STARTED_ONLY


def clear_folder(out: Path, resume: bool) -> None:
    """Make `out` ready for a fresh run (or keep it for a resume). A finished or checkpointed run
    it held is moved aside to `replaced_path(out)` rather than deleted, until the new run has
    finished (`drop_replaced`): a new run stopped by Ctrl-C, a divergence or a full disk leaves
    the old one there. Where a replaced run is already waiting there, `out` holds only an
    unfinished replacement of it, whose files go; the replaced run stays. Only the files the run
    wrote move or go: what else the folder holds (a user's notes, a tuning, a study) stays."""
    finish_interrupted_move(out)
    if not resume and out.exists():
        backup = replaced_path(out)
        own = run_files(out)
        if own and not backup.exists() and (out / CHECKPOINT).exists():
            _move_aside(own, out, backup)
        else:
            for path in own:  # a run stopped in its first epoch, or an unfinished replacement: nothing to keep
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.replacing")


def _move_aside(own: list[Path], out: Path, backup: Path) -> None:
    """Move the run's files (only them) into a staging folder, then rename it to `backup` in one
    step: a kill part-way leaves the staging folder, which the next run moves back first."""
    staging = _staging_path(out)
    try:
        staging.mkdir()
        for path in own:
            path.rename(staging / path.name)
        staging.rename(backup)
    except OSError as exc:
        raise RunError(f"cannot move the run in {out} aside to {backup} ({exc.strerror}); "
                       "remove it yourself or choose another --out") from None


def finish_interrupted_move(out: Path) -> None:
    """A move aside that a kill cut short: put its files back where they were."""
    staging = _staging_path(out)
    if not staging.is_dir():
        return
    for path in sorted(staging.iterdir()):
        if not (out / path.name).exists():
            path.rename(out / path.name)
    if not any(staging.iterdir()):
        staging.rmdir()


def _return_others(backup: Path, out: Path) -> None:
    """Move what is not the run's (nested folders, a study's report) from a replaced run's backup
    to `out` (a backup made before runs moved only their own files aside held the whole folder)."""
    own = set(run_files(backup))
    for path in sorted(backup.iterdir()):
        if path not in own and not (out / path.name).exists():
            path.rename(out / path.name)


def replaced_path(out: Path) -> Path:
    """Where --overwrite keeps the run it replaces until the new one finishes: a hidden sibling."""
    return out.with_name(f".{out.name}.replaced")


def drop_replaced(out: Path) -> None:
    backup = replaced_path(out)
    if backup.exists():
        _return_others(backup, out)
        shutil.rmtree(backup)


def check_same_spec(spec: Spec, out: Path) -> None:
    differences = spec_changes(spec, out)
    if differences:
        raise RunError(f"cannot resume {out}: it was made from a different spec:\n" + describe_changes(differences))


def spec_changes(spec: Spec, out: Path) -> list[tuple[tuple, object, object]]:
    """What differs between the spec a run folder was made from and `spec`, beyond what a resume
    may change (`RESUMABLE_CHANGES`): (key path, old, new) for each difference."""
    try:
        previous = yaml.safe_load((out / RESOLVED).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunError(f"cannot resume: {out / RESOLVED} is missing or unreadable ({exc})") from None
    # repeats and study: sections of the study a run belongs to, not of the run itself
    return [d for d in _differences(previous, spec.raw) if d[0] not in RESUMABLE_CHANGES
            and d[0][:1] not in STUDY_ONLY | WHERE_IT_RUNS and d[0][:2] not in DESCRIPTION]


def describe_changes(differences: list, limit: int = 20) -> str:
    return "\n".join(f"  {'.'.join(map(str, path))}: {old!r} -> {new!r}" for path, old, new in differences[:limit])


def _differences(a, b, path=()) -> list:
    if isinstance(a, dict) and b == "<absent>" or isinstance(b, dict) and a == "<absent>":
        a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})  # compare key by key
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(key, "<absent>"), b.get(key, "<absent>"), path + (key,))
        return out
    return [] if a == b else [(path, a, b)]


def read_history(out: Path) -> list:
    """metrics.jsonl's records. A last line cut short (the run was killed while appending it) is
    dropped: its epoch is redone. Damage anywhere else is a RunError naming the line."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise RunError(f"{path}:{number}: not a JSON record ({exc.msg}); the history is damaged: "
                           "start the run afresh with --overwrite") from None
    return records


def atomic_write(path: Path, write, mode: str = "w") -> None:
    """Write `path` through a temporary file and a rename: a kill or a full disk mid-write leaves
    the previous file whole (and no temporary file behind); the failure is a RunError naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = " (the previous one is kept)" if path.exists() else ""
        raise RunError(f"could not write {path}: {exc.strerror or exc}{kept}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def metrics_text(metrics: dict) -> str:
    """metrics.json's text (NaN and infinities as null, which JSON has)."""
    return json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n"


def _json_safe(value):
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



def append_record(out: Path, record: dict) -> None:
    """One epoch's record, appended to metrics.jsonl (before that epoch's checkpoint is written,
    so every epoch up to a checkpoint's has its record)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
