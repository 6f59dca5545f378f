"""One run end to end: the folder checked -> data and model -> hooks attached -> (resume) ->
training (genspec/train/loop.py) -> the metrics.json that marks the run finished.

What a run does beyond training comes from the hooks registered by the modules in
`BUILTIN_HOOKS` (and by plugins): balancing, traces, evaluation, checkpoints, progress, the
report and experiment tracking. This module only puts them together, in the order the registry
gives.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import yaml

from genspec.compiler import distributed as dist
from genspec.errors import RunError
from genspec.lang.spec import Spec
from genspec.train import loop
from genspec.train.checkpoint import restore
from genspec.train.folder import (RESOLVED, atomic_write_text, check_folder, clear_folder, drop_replaced,
                                  finish_interrupted_move, write_manifest, write_metrics)
from genspec.train.guard import folder_lock
from genspec.train.hooks import Hooks, TrainingRun

# Modules whose import registers a built-in hook (train/hooks.py has the registry).
BUILTIN_HOOKS = ("genspec.train.constraints", "genspec.train.checkpoint", "genspec.train.trace", "genspec.train.progress",
                 "genspec.measure.balance", "genspec.measure.evaluate", "genspec.report.run_report",
                 "genspec.report.tracking")


def register_builtin_hooks() -> None:
    for module in BUILTIN_HOOKS:
        importlib.import_module(module)


def run(spec: Spec, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
        progress: bool = True) -> dict:
    """Train and evaluate a spec, writing everything into its run folder. Returns the final metrics."""
    out = Path(out or Path("reports") / spec.name)
    if out.is_symlink():  # --out LINK: the run lives in the folder the link names (--overwrite moves that aside)
        if not out.exists():
            raise RunError(f"{out} is a link to {os.readlink(out)}, which does not exist; create it or choose another --out")
        out = out.resolve()
    world = dist.from_environment()  # several processes under torchrun (`genspec run --nproc N`)
    dist.check_batch_split(spec, world.size)  # also for a world an outer torchrun started
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a folder; choose another --out")
    register_builtin_hooks()
    # rank 0 writes the folder; the lock keeps a second process (a rerun, a left-over worker) out of it
    with folder_lock(out) if world.main else contextlib.nullcontext(), loop.torch_failures_as_messages(spec.train):
        return _run(spec, out, resume, overwrite, progress, world)


def _run(spec: Spec, out: Path, resume: bool, overwrite: bool, progress: bool, world: dist.World) -> dict:
    if world.main:
        finish_interrupted_move(out)  # a kill while --overwrite moved a run aside: make it whole first
        check_folder(spec, out, resume, overwrite)
    splits, model = loop.after_checks(spec, lambda: loop.prepare(spec, world))
    state = TrainingRun(spec, model, splits, out, world, resumed=resume, progress=progress and world.main)
    hooks = Hooks.attach(state)  # here, before the folder changes: a hook that cannot start leaves it intact
    # Only now, with data, model and hooks in hand, is an old run replaced.
    if world.main:
        clear_folder(out, resume)
    if world.distributed:
        dist.barrier()
    if resume:
        state.start_epoch, state.history = restore(model, out, model.device, spec.train["epochs"], world, spec.train["seed"])
    if world.main:  # the copy describes the run as it now stands (a resume may have asked for more epochs)
        atomic_write_text(out / RESOLVED, yaml.safe_dump(spec.raw, sort_keys=False))
    loop.fit(state, hooks)
    if not world.main:
        return {}
    write_manifest(out, [RESOLVED, "layers.md", *state.metrics.get("grids", {}).values()])
    write_metrics(out, state.metrics)
    drop_replaced(out)  # the new run is complete: the one it replaced can go
    return state.metrics
