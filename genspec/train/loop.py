"""Stage 6: the training loop, its checkpoints and the run folder.

Reads top to bottom: prepare the folder -> data -> model -> (resume) -> epochs of phase
steps -> evaluate -> report. A step takes one batch and runs one round of the phase cycle:
each phase repetition starts a round of its own, so `repeat: 5` on the critic is WGAN's
n_critic, and a phase with `batch: same` joins the round before it (a GAN's generator update
on its discriminator's batch, the papers' "1:1"). Checkpoints are written atomically after every epoch (or
every `checkpoint_every`), with the RNG state, so `--resume` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from genspec.compiler.model import Model, choose_device
from genspec.data.datasets import Splits, batch_starts, batches, load_data
from genspec.errors import RunError, plural
from genspec.measure import fidelity
from genspec.compiler import distributed as dist
from genspec.train import trace as step_trace
from genspec.measure.balance import Balancer
from genspec.train.guard import LOCK_FILE, folder_lock
from genspec.measure.evaluate import evaluate_losses, final_evaluation, graph_samples, grid_sources, metrics_text
from genspec.report.run_report import write_layer_tables, write_report
from genspec.lang.spec import Spec

CHECKPOINT = "checkpoint.pt"
RESOLVED = "spec.resolved.yaml"
# Keys allowed to differ when resuming: more epochs, or a different checkpoint cadence.
# How batches are fed (train.loader, train.workers) does not change them, so it may change too, and
# so may whether steps replay from CUDA graphs (the same kernels either way).
STUDY_ONLY = {("repeats",), ("study",), ("sweep",)}
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "checkpoint_every"), ("train", "log_every"),
                     ("train", "loader"), ("train", "workers"), ("train", "cuda_graphs"), ("train", "memory_budget")}


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
    # rank 0 writes the folder; the lock keeps a second process (a rerun, a left-over worker) out of it
    with folder_lock(out) if world.main else contextlib.nullcontext(), torch_failures_as_messages(spec.train):
        return _run(spec, out, resume, overwrite, progress, world)


@contextlib.contextmanager
def torch_failures_as_messages(train: dict, runs_at_once: int = 1):
    """What torch raises for a run that does not fit its device, or for a value no spec check
    could decide, as a message: the run's folder keeps its last checkpoint either way."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "out of memory"
        together = (f", or --no-stack (this trains {runs_at_once} runs at once); running the study again resumes it"
                    if runs_at_once > 1 else "; --resume continues from the last checkpoint")
        raise RunError(f"out of memory ({first_line}); try a smaller train.batch_size (now {train['batch_size']})"
                       + together) from None
    except MemoryError:
        raise RunError(f"out of memory: the machine could not hold this run; try a smaller train.batch_size (now "
                       f"{train['batch_size']}) or smaller networks (genspec validate estimates a step's memory)") from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "DefaultCPUAllocator" in str(exc):  # the CPU allocator's refusal
            first = str(exc).splitlines()[0]
            raise RunError(f"out of memory on the CPU ({first}); try a smaller train.batch_size (now "
                           f"{train['batch_size']}) or smaller networks; --resume continues from the last checkpoint") from None
        if "input should be between 0 and 1" not in str(exc):  # torch's binary_cross_entropy on the CPU
            raise
        raise RunError("a bce loss got a prediction outside [0, 1]: bce needs probabilities, so its first argument "
                       "must stay in [0, 1] (a network ending in a sigmoid, or an expression of one that stays "
                       "inside)") from None


def _run(spec: Spec, out: Path, resume: bool, overwrite: bool, progress: bool, world: dist.World) -> dict:
    if world.main:
        _finish_interrupted_move(out)  # a kill while --overwrite moved a run aside: make it whole first
        _check_folder(spec, out, resume, overwrite)
    splits, model = after_checks(spec, lambda: prepare(spec, world))
    device = model.device
    balancer = Balancer(spec, model, splits.train) if spec.train.get("balance") else None
    # Only now, with data and model in hand, is an old run replaced: a failure above leaves it intact.
    if world.main:
        _clear_folder(out, resume)
    if world.distributed:
        dist.barrier()
    start_epoch, history = 1, []
    if resume:
        start_epoch, history = _restore(model, out, device, spec.train["epochs"], world, spec.train["seed"])
    elif world.main:
        write_layer_tables(spec, out)
    if world.main:  # the copy describes the run as it now stands (a resume may have asked for more epochs)
        _atomic_write_text(out / RESOLVED, yaml.safe_dump(spec.raw, sort_keys=False))
    _train_epochs(spec, model, splits, out, start_epoch, history, progress and world.main, balancer, world)
    if not world.main:
        return {}
    metrics = final_evaluation(spec, model, splits, out, history, progress and sys.stderr.isatty())
    write_report(spec, out, metrics, history)
    write_manifest(out, [RESOLVED, "layers.md", *metrics.get("grids", {}).values()])
    write_metrics(out, metrics)
    _drop_replaced(out)  # the new run is complete: the one it replaced can go
    return metrics


FINAL_METRICS = "metrics.json"


def write_metrics(out: Path, metrics: dict) -> None:
    """metrics.json, atomically and last of a run's files: it marks the run finished (a study
    skips it, `load_run` reads it), so it must not be there before the report, nor half there."""
    _atomic_write_text(out / FINAL_METRICS, metrics_text(metrics))


def finished_metrics(out: Path) -> dict | None:
    """A finished run's final metrics; None where the run has not finished, or its metrics.json
    is unreadable (damaged outside genspec: the run is then treated as unfinished, and resumed)."""
    try:
        metrics = json.loads((out / FINAL_METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def after_checks(spec: Spec, load):
    """`load()` (the data and the model), after the checks a run must pass before training rather
    than after it (the feature extractor, the grids' sources). Whatever of these and `load` finds
    missing is said in one go: learning it one fix and rerun at a time is slow."""
    missing = []
    for check in (lambda: fidelity.preflight(spec.evaluate), lambda: grid_sources(spec)):
        try:
            check()
        except RunError as exc:
            missing.append(str(exc))
    try:
        loaded = load()
    except RunError as exc:
        missing.append(str(exc))
    if missing:
        raise RunError("\ngenspec: ".join(missing))
    return loaded


def prepare(spec: Spec, world: dist.World = dist.SINGLE) -> tuple[Splits, Model]:
    """The data on the device and the model, seeded: the same start on every rank of a distributed
    run (which joins its process group here), each rank then drawing its own noise."""
    device = dist.setup(world, spec.train["device"]) if world.distributed else choose_device(spec.train["device"])
    seed = spec.train["seed"]
    torch.manual_seed(seed)
    splits = load_data(spec.data, seed, spec.train["loader"], spec.train["workers"])
    splits = Splits(splits.train.to(device), splits.val and splits.val.to(device), splits.test.to(device), splits.notes)
    torch.manual_seed(seed)  # weights do not depend on how much randomness data loading used
    model = Model(spec, device, world)  # under --nproc with a DDP wrapper per trained network
    model.set_references(splits.train)  # virtual batch norm's reference: real images where a network reads x
    if world.distributed:
        dist.broadcast_module_state([model.networks, model.priors, model.states])  # one start for every rank
        torch.manual_seed(dist.rank_seed(seed, world))  # each rank draws its own noise
    return splits, model


def _check_folder(spec: Spec, out: Path, resume: bool, overwrite: bool) -> None:
    has_run = bool(run_files(out))
    if has_run and not resume and _stopped_before_first_epoch(out):
        print(f"genspec: {out} holds a run stopped before its first epoch ended (no checkpoint, no metrics); "
              "starting it afresh", file=sys.stderr)
        return
    if resume:
        if not (out / CHECKPOINT).exists():
            started = out.exists() and _stopped_before_first_epoch(out)
            raise RunError(f"nothing to resume in {out}: no {CHECKPOINT} there"
                           + ("; it stopped before its first checkpoint: run it again without --resume to start afresh"
                              if started else ""))
        _check_same_spec(spec, out)
    elif not has_run and other_files(out):
        raise RunError(f"{out} is not empty and is not a genspec run folder; choose another --out")
    elif has_run and not overwrite:
        raise RunError(f"{out} already holds a run; use --resume to continue it or --overwrite to replace it")


RUN_MARKERS = (RESOLVED, CHECKPOINT, "metrics.jsonl", "metrics.json")
STARTED_ONLY = {RESOLVED, "layers.md", ".genspec-files"}  # what a run writes before its first epoch ends
# A study of a spec reports in the spec's run folder (reports/<name>/) beside a run of it.
STUDY_FILES = ("study.md", "study_*.csv")
# The files a run writes, by name (a folder written before the manifest existed is known by
# these); grids with names of their own are in the manifest the run keeps.
MANIFEST = ".genspec-files"
KNOWN_RUN_FILES = ("spec.resolved.yaml", "layers.md", "metrics.jsonl", "metrics.json", "checkpoint.pt", "report.md",
                   "trace.csv", "trace.png", "losses.png", "graph.png", "labels.png", "samples.png",
                   "reconstructions.png", "interpolations.png", "*.tmp", MANIFEST)


def run_files(out: Path) -> list[Path]:
    """What in `out` the run there wrote: the files its manifest names and genspec's own file
    names. Nothing else is the run's to move or delete: a user's notes beside it, a folder inside
    it (a tuning's `tune/`, a study's `<config>/seed<k>/`), a study's report."""
    if not out.is_dir():
        return []
    named = set(_manifest(out))
    return sorted(p for p in out.iterdir() if p.is_file() and not p.is_symlink() and p.name != LOCK_FILE
                  and (p.name in named or any(fnmatch.fnmatch(p.name, pattern) for pattern in KNOWN_RUN_FILES))
                  and not any(fnmatch.fnmatch(p.name, pattern) for pattern in STUDY_FILES))


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
    _atomic_write_text(out / MANIFEST, json.dumps(written) + "\n")


def _stopped_before_first_epoch(out: Path) -> bool:
    """A genspec run folder holding only what a run writes before its first epoch ends: nothing
    in it is worth keeping, so running the spec again needs no --overwrite."""
    names = {p.name for p in run_files(out)}
    return RESOLVED in names and names <= STARTED_ONLY


def _clear_folder(out: Path, resume: bool) -> None:
    """Make `out` ready for a fresh run (or keep it for a resume). A finished or checkpointed run
    it held is moved aside to `replaced_path(out)` rather than deleted, until the new run has
    finished (`_drop_replaced`): a new run stopped by Ctrl-C, a divergence or a full disk leaves
    the old one there. Where a replaced run is already waiting there, `out` holds only an
    unfinished replacement of it, whose files go; the replaced run stays. Only the files the run
    wrote move or go: what else the folder holds (a user's notes, a tuning, a study) stays."""
    _finish_interrupted_move(out)
    if not resume and out.exists():
        backup = replaced_path(out)
        own = run_files(out)
        if own and not backup.exists() and (out / CHECKPOINT).exists():
            _move_aside(own, out, backup)
        else:
            for path in own:  # a run stopped in its first epoch, or an unfinished replacement: nothing to keep
                path.unlink()
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


def _finish_interrupted_move(out: Path) -> None:
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


def _drop_replaced(out: Path) -> None:
    backup = replaced_path(out)
    if backup.exists():
        _return_others(backup, out)
        shutil.rmtree(backup)


def _check_same_spec(spec: Spec, out: Path) -> None:
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
    return [d for d in _differences(previous, spec.raw) if d[0] not in RESUMABLE_CHANGES and d[0][:1] not in STUDY_ONLY]


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


def load_checkpoint(folder: Path, device) -> dict:
    """A run folder's checkpoint (weights only). A file cut short (a full disk, a copy that
    stopped) or not genspec's is a RunError that names it, not an unpickling traceback."""
    path = Path(folder) / CHECKPOINT
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{Path(folder)} has no {CHECKPOINT}: not a genspec run folder, or one stopped before its first checkpoint")
    except Exception as exc:  # torch raises RuntimeError, EOFError or pickle's errors for a damaged file
        raise RunError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}); "
                       "the checkpoint is damaged: start the run afresh with --overwrite") from None
    if not isinstance(state, dict) or not {"epoch", "model"} <= set(state):
        raise RunError(f"{path} is not a genspec checkpoint (it has no epoch and model)")
    return state


def _restore(model: Model, out: Path, device, epochs: int, world: dist.World, seed: int) -> tuple[int, list]:
    state = load_checkpoint(out, device)
    done = int(state["epoch"])
    if done > epochs:  # equal: training is over, and the final evaluation runs again
        raise RunError(f"{out} already has {done} epoch{'s' if done != 1 else ''}, more than the {epochs} asked; "
                       f"to train on, ask for more, e.g. --resume --set train.epochs={done + 10}")
    try:
        model.load_state_dict(state["model"])
    except RunError as exc:
        raise RunError(f"{out / CHECKPOINT}: {exc}") from None
    epoch = int(state["epoch"])
    _restore_rng(state, world, seed, epoch)
    if not world.main:  # another rank of a distributed run: rank 0 keeps the folder
        return epoch + 1, []
    if epoch < epochs:  # training on: the old final metrics no longer describe the run (nor mark it finished)
        (out / FINAL_METRICS).unlink(missing_ok=True)
    history = [h for h in _read_history(out) if h["epoch"] <= epoch]  # epochs after the checkpoint are redone
    # each epoch's record is appended before its checkpoint is written, so every epoch up to the
    # checkpoint's has one; a gap means metrics.jsonl was cut or removed since
    lost = sorted(set(range(1, epoch + 1)) - {h["epoch"] for h in history})
    if lost:
        raise RunError(f"{out / 'metrics.jsonl'} has no record of {plural(len(lost), 'epoch')} ({_ranges(lost)}) though the "
                       f"checkpoint holds {plural(epoch, 'epoch')}: the file was cut or removed, and a resumed run would "
                       "leave them out of its report. Put the file back, or start afresh with --overwrite")
    _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    step_trace.truncate(out, epoch)
    return epoch + 1, history


def _ranges(numbers: list[int]) -> str:
    """Sorted [1, 2, 3, 7] -> '1-3, 7'."""
    runs = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _read_history(out: Path) -> list:
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


def _train_epochs(spec: Spec, model: Model, splits: Splits, out: Path, start: int, history: list, progress: bool,
                  balancer: Balancer | None = None, world: dist.World = dist.SINGLE) -> None:
    epochs = spec.train["epochs"]
    steps_per_epoch = epoch_steps(spec.train, len(splits.train), world.size)
    bar = _progress_bar(spec, epochs, steps_per_epoch, start, progress)
    trace = step_trace.StepTrace(step_trace.trace_keys(spec) if world.main else [], model.device)
    for epoch in range(start, epochs + 1):
        began = time.perf_counter()
        updates: dict[str, int] = {}
        train_means = _one_epoch(spec, model, splits, epoch, bar, trace, (epoch - 1) * steps_per_epoch, world, updates)
        balance = None
        if balancer is not None and balancer.due(epoch):
            balance = balancer.step(lambda n: graph_samples(spec, model, spec.train["balance"]["images"], n))
            if world.distributed:
                dist.broadcast_module_state([model.priors])  # rank 0's label weights for every rank
        checkpoint_due = epoch % spec.train["checkpoint_every"] == 0 or epoch == epochs
        if not world.main:
            dist.agree(None, world)  # rank 0 evaluates and writes; a stop there stops every rank
            if checkpoint_due:
                dist.gather_rng_states(world, model.device)  # for rank 0's checkpoint
            continue
        record = {"epoch": epoch, "time_s": round(time.perf_counter() - began, 4), "train": train_means,
                  "test": evaluate_losses(spec, model, splits.test), "updates": updates}
        summary = trace.flush(out, epoch)
        if summary:
            record["trace"] = summary
        if balance is not None:
            record["balance"] = balance
        bad = [name for name, value in record["test"].items() if not math.isfinite(value)]
        dist.agree(RunError(f"test loss {bad[0]!r} is {record['test'][bad[0]]} after epoch {epoch}; the run stopped "
                            "(the last checkpoint is kept). Try a smaller learning rate.") if bad else None, world)
        history.append(record)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if checkpoint_due:
            save_checkpoint(model, out, epoch, dist.gather_rng_states(world, model.device) if world.distributed else None)
        _epoch_message(bar, spec, record, epochs)
    if bar is not None:
        bar.close()


def epoch_steps(train: dict, examples: int, world_size: int = 1) -> int:
    """Steps an epoch counts (what step numbers in traces and the progress bar advance by)."""
    steps = max(1, len(batch_starts(examples, train["batch_size"], world_size)))
    return min(steps, train["max_steps"]) if train.get("max_steps") else steps


def phase_cycle(phases: list, epoch: int) -> list[list[int]]:
    """The rounds of the phases active in `epoch`: step n of the run takes one batch and trains
    the phases of round cycle[n % len(cycle)] on it, in order. Each repetition of a phase starts a
    round, unless the phase has `batch: same`: it then joins the round before it, so
    [{update: [dis]}, {update: [gen], batch: same}] updates both networks once per batch. The
    cycle runs on across epochs (indexed by the run's step, not the epoch's) so that a phase late
    in the cycle still trains when an epoch has fewer steps than the cycle, and a resumed run
    picks up where it left off."""
    rounds: list[list[int]] = []
    for i, phase in enumerate(phases):
        if not phase.active(epoch):
            continue
        for _ in range(phase.repeat):
            if phase.batch == "same" and rounds:
                rounds[-1].append(i)
            else:  # a first phase of the epoch's cycle takes a batch even with batch: same
                rounds.append([i])
    return rounds


def phase_networks(spec: Spec) -> list[list[str]]:
    """The networks (and trainable priors) each phase's optimiser steps update."""
    return [[net for name in phase.update for net in spec.objectives[name].networks] for phase in spec.phases]


def count_updates(updates: dict, networks: list[str]) -> None:
    for net in networks:
        updates[net] = updates.get(net, 0) + 1


def add_losses(sums: dict, counts: dict, losses: dict) -> None:
    """Add one step's losses to the epoch's running sums, on the device, in float32: under bf16
    autocast some losses (a mean) are bfloat16, and a bfloat16 sum stops growing at ~256x a loss."""
    for name, value in losses.items():
        sums[name] = sums.get(name, 0) + value.float()
        counts[name] = counts.get(name, 0) + 1


def _one_epoch(spec: Spec, model: Model, splits: Splits, epoch: int, bar, trace=None, first_step: int = 0,
               world: dist.World = dist.SINGLE, updates: dict | None = None) -> dict:
    """Trains one epoch; returns the mean of each loss over the steps that computed it. `updates`
    (network -> count) gains one per optimiser step of each network."""
    updates = {} if updates is None else updates
    model.train(True)
    shuffle = torch.Generator().manual_seed(spec.train["seed"] * 100_003 + epoch)
    cycle = phase_cycle(spec.phases, epoch)
    if not cycle:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    max_steps = spec.train.get("max_steps")
    finite = FiniteWatch()
    log_every = spec.train["log_every"]
    networks_of = phase_networks(spec)
    # the same global batches on every rank, each rank its own slice of each
    for step, (x, y) in enumerate(batches(splits.train, spec.train["batch_size"], shuffle, world)):
        if max_steps and step >= max_steps:
            break
        losses = {}
        for phase in cycle[(first_step + step) % len(cycle)]:
            computed = model.train_step(phase, x, y)
            finite.record(step, computed)
            add_losses(sums, counts, computed)
            count_updates(updates, networks_of[phase])
            losses.update(computed)
        if trace is not None:
            trace.record(first_step + step + 1, losses)
        if (step + 1) % log_every == 0:  # the only host-device syncs of the loop: once per log interval
            finite.check(epoch, world)
            if bar is not None:
                bar.set_postfix({k: f"{float(v):.4g}" for k, v in losses.items() if "/" not in k}, refresh=False)
        if bar is not None:
            bar.update(1)
    finite.check(epoch, world)
    if world.distributed:
        dist.average_tensors([t for t in sums.values() if torch.is_tensor(t)])  # means over every rank's examples
    return {name: float(total) / counts[name] for name, total in sums.items()}


class FiniteWatch:
    """Remembers, on the device, the first step whose losses were not finite, so the loop never
    waits for the device inside a step; `check` reads it back (once per log interval) and stops
    the run with the loss, its value and the step."""

    def __init__(self):
        self.first: dict[tuple, list] = {}  # loss names of a phase -> [first bad step, its values]

    def record(self, step: int, losses: dict) -> None:
        if not losses:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        entry = self.first.get(tuple(losses))
        if entry is None:
            entry = self.first[tuple(losses)] = [torch.full((), -1, device=values.device), torch.zeros_like(values)]
        new = ~torch.isfinite(values).all() & (entry[0] < 0)
        entry[0] = torch.where(new, step, entry[0])
        entry[1] = torch.where(new, values, entry[1])

    def check(self, epoch: int, world: dist.World = dist.SINGLE) -> None:
        dist.agree(self._problem(epoch), world)  # every rank stops together, or none does

    def _problem(self, epoch: int) -> RunError | None:
        found = [(int(first), names, values) for names, (first, values) in self.first.items()]
        found = [f for f in found if f[0] >= 0]
        if not found:
            return None
        step, names, values = min(found, key=lambda f: f[0])  # the earliest, whichever phase it was in
        values = values.tolist()
        bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
        kept = "the last checkpoint is kept" if epoch > 1 else "no checkpoint was written yet"
        return RunError(f"loss {names[bad]!r} became {values[bad]} at epoch {epoch}, step {step + 1}; "
                        f"the run stopped ({kept}). Try a smaller learning rate.")


def _restore_rng(state: dict, world: dist.World, seed: int, epoch: int) -> None:
    """Continue the random streams the checkpoint saved: one process its own; under --nproc each
    rank its own, when the checkpoint holds as many ranks' streams. With another number of
    processes (or a checkpoint of one process) every rank starts a stream of its own instead
    (rank 0's on every rank would make the ranks draw the same noise): a fresh draw, not a replay,
    as each rank's share of a batch has changed too."""
    if world.distributed:
        streams = state.get("rank_rng", [])
        if len(streams) != world.size:
            if world.main:
                saved = f"{len(streams)} processes" if streams else "one process"
                print(f"genspec: the checkpoint holds the random streams of {saved}, not {world.size}: each process "
                      "draws a fresh stream of its own, so the resumed epochs are not a replay", file=sys.stderr)
            torch.manual_seed(dist.rank_seed(seed, world, epoch))
            return
        own = streams[world.rank]
        torch.set_rng_state(own["cpu"].cpu())
        if "cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["cuda"].cpu(), torch.cuda.current_device())  # setup chose this rank's GPU
        return
    torch.set_rng_state(state["rng"].cpu())
    if torch.cuda.is_available():  # the GPUs this machine has (it may have fewer than the saving one)
        for index, cuda_state in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def save_checkpoint(model: Model, out: Path, epoch: int, rank_streams: list[dict] | None = None) -> None:
    """The model, optimiser moments and random streams after `epoch`, written atomically.
    `rank_streams`: under --nproc every rank's streams (`distributed.gather_rng_states`)."""
    state = {"format": 1, "epoch": epoch, "model": model.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if rank_streams is not None:
        state["rank_rng"] = rank_streams
    def write(f):
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())

    _atomic_write(out / CHECKPOINT, write, "wb")


def _atomic_write(path: Path, write, mode: str = "w") -> None:
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


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text))


def _progress_bar(spec: Spec, epochs: int, steps: int, start: int, progress: bool):
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=epochs * steps, initial=(start - 1) * steps, desc=spec.name, unit="step", dynamic_ncols=True)


def _epoch_message(bar, spec: Spec, record: dict, epochs: int) -> None:
    test = ", ".join(f"{k} {v:.4g}" for k, v in record["test"].items())
    train = ", ".join(f"{k} {v:.4g}" for k, v in record["train"].items() if "/" not in k)
    line = f"{spec.name} epoch {record['epoch']}/{epochs} ({record['time_s']:.1f}s)  train: {train}  test: {test}"
    if bar is not None:
        bar.write(line)
    else:
        print(line, file=sys.stderr, flush=True)
