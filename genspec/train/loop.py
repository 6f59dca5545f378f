"""The training loop: epochs of phase steps, and the events it fires for hooks.

Reads top to bottom: `prepare` (the data and the model, seeded) -> `fit` (epochs of steps).
A step takes one batch and runs one round of the phase cycle: each phase repetition starts a
round of its own, so `repeat: 5` on the critic is WGAN's n_critic, and a phase with `batch:
same` joins the round before it (a GAN's generator update on its discriminator's batch, the
papers' "1:1"). The loop imports no optional part of a run: balancing, traces, evaluation,
checkpoints, progress and the report listen to its events (train/hooks.py). The run folder and
resuming are train/folder.py and train/checkpoint.py; one run end to end is
genspec/experiments/run.py.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from genspec.compiler import distributed as dist
from genspec.compiler.model import Model, choose_device
from genspec.data.datasets import Splits, batch_starts, batches, load_data
from genspec.errors import RunError
from genspec.lang.spec import Spec
from genspec.train.folder import append_record
from genspec.train.hooks import Hooks, TrainingRun

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


def after_checks(spec: Spec, load):
    """`load()` (the data and the model), after the checks a run must pass before training rather
    than after it: every registered hook's preflight (the feature extractor, the grids'
    sources). Whatever of these and `load` finds missing is said in one go: learning it one fix
    and rerun at a time is slow."""
    from genspec.train.hooks import preflight

    missing = preflight(spec)
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


def fit(run: TrainingRun, hooks: Hooks) -> None:
    """Train `run` from its start epoch to `train.epochs`, firing the hooks' events. Each epoch's
    record (its train means and updates, and what the hooks add) is appended to metrics.jsonl
    before that epoch's checkpoint, so a resume finds a record for every checkpointed epoch."""
    spec, world = run.spec, run.world
    epochs = spec.train["epochs"]
    run.steps_per_epoch = epoch_steps(spec.train, len(run.splits.train), world.size)
    hooks.fire("run_start", run)
    for epoch in range(run.start_epoch, epochs + 1):
        began = time.perf_counter()
        updates: dict[str, int] = {}
        train_means = _one_epoch(spec, run.model, run.splits, epoch, hooks, run, (epoch - 1) * run.steps_per_epoch,
                                 world, updates)
        record = {"epoch": epoch, "time_s": round(time.perf_counter() - began, 4), "train": train_means,
                  "updates": updates}
        hooks.fire("epoch_end", run, record)  # every process: a hook's collectives (balancing) run on all
        checkpoint_due = epoch % spec.train["checkpoint_every"] == 0 or epoch == epochs
        streams = dist.gather_rng_states(world, run.model.device) if checkpoint_due and world.distributed else None
        if not world.main:  # rank 0 keeps the folder
            continue
        run.history.append(record)
        append_record(run.out, record)
        if checkpoint_due:
            hooks.fire("checkpoint", run, epoch, streams)
    if world.main:
        hooks.fire("run_end", run)


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


def _one_epoch(spec: Spec, model: Model, splits: Splits, epoch: int, hooks: Hooks | None = None,
               run: TrainingRun | None = None, first_step: int = 0, world: dist.World = dist.SINGLE,
               updates: dict | None = None) -> dict:
    """Trains one epoch; returns the mean of each loss over the steps that computed it. `updates`
    (network -> count) gains one per optimiser step of each network."""
    updates = {} if updates is None else updates
    after_update = hooks.after_update if hooks is not None else []
    step_end = hooks.step_end if hooks is not None else []
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
            for listener in after_update:
                listener(run, phase, computed)
            losses.update(computed)
        for listener in step_end:
            listener(run, first_step + step + 1, losses)
        if (step + 1) % log_every == 0:  # the only host-device syncs of the loop: once per log interval
            finite.check(epoch, world)
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
