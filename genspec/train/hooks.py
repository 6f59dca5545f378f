"""The training loop's events and the one registry of the hooks that listen to them.

The loop (train/loop.py) knows batches, phases, optimiser steps and epochs, nothing more.
Everything optional attaches here: CGAN-MBL's balancing, step traces, the per-epoch test
losses and the final evaluation, checkpoints, progress, the report, experiment tracking, and
plugins' hooks. A hook
is a class registered under a name; `attach(run)` decides from the run (its spec, its rank)
whether the run needs it and returns an instance or None. Built-in hooks and plugins register
the same way:

    @register_hook("clip_critic", order=AFTER_STEP)
    class ClipCritic(Hook):
        @classmethod
        def attach(cls, run):
            return cls() if "dis" in run.spec.networks else None

        def after_update(self, run, phase, losses):
            ...

Events, in the order a run fires them (every method is optional; a hook that does not override
one costs nothing there, as the loop calls only the methods hooks define):

    run_start(run)                          data, model and folder ready (a resumed run too)
    after_update(run, phase, losses)        after the optimiser steps of one phase's objectives
    step_end(run, step, losses)             after each batch: the run's step number (from 1)
                                            and the losses of the phases trained on it
    epoch_end(run, record)                  on every process; hooks add what they measured to
                                            the epoch's record before it goes to metrics.jsonl
    checkpoint(run, epoch, rank_streams)    when a checkpoint is due, after the record is written
    run_end(run)                            after the last epoch, on the main process

Within an event hooks run by `order` (then by name): what draws random numbers or changes the
model (balancing) comes before what measures it (evaluation), and what writes comes last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

EVENTS = ("run_start", "after_update", "step_end", "epoch_end", "checkpoint", "run_end")

# orders of the built-in hooks (a plugin picks its own place among them)
AFTER_STEP = 10  # constraints on the weights an optimiser step just changed (weight clipping)
BALANCING = 20  # CGAN-MBL relabels and reweights the generator's labels
EVALUATION = 30  # test losses per epoch, the final evaluation at the end
TRACING = 40  # step traces, flushed per epoch
CHECKPOINTING = 50
REPORTING = 60  # layer tables at the start, report.md at the end (after the final evaluation)
TRACKING = 70  # TensorBoard / MLflow: each epoch's whole record, the report as an artifact
PROGRESS = 90  # the progress bar and epoch lines: last, so they print the whole record


@dataclass
class TrainingRun:
    """What a hook sees of the run it serves."""

    spec: object  # genspec.lang.spec.Spec
    model: object  # genspec.compiler.model.Model
    splits: object  # genspec.data.datasets.Splits
    out: Path
    world: object  # genspec.compiler.distributed.World
    start_epoch: int = 1
    steps_per_epoch: int = 1
    history: list = field(default_factory=list)  # the epochs' records, resumed ones included
    resumed: bool = False
    progress: bool = True
    metrics: dict = field(default_factory=dict)  # the final metrics, set at run_end by the evaluation

    @property
    def epochs(self) -> int:
        return self.spec.train["epochs"]


class Hook:
    """A listener to the loop's events; override the ones needed (see the module's docstring)."""

    @classmethod
    def attach(cls, run: TrainingRun) -> "Hook | None":
        """An instance for this run, or None where the run does not need the hook."""
        return cls()

    @staticmethod
    def preflight(spec) -> None:
        """Raise RunError, before any data is loaded, for what the hook will lack (a feature
        extractor's weights, a grid's source): a run should fail before training, not after."""

    def run_start(self, run: TrainingRun) -> None: ...
    def after_update(self, run: TrainingRun, phase: int, losses: dict) -> None: ...
    def step_end(self, run: TrainingRun, step: int, losses: dict) -> None: ...
    def epoch_end(self, run: TrainingRun, record: dict) -> None: ...
    def checkpoint(self, run: TrainingRun, epoch: int, rank_streams: list | None) -> None: ...
    def run_end(self, run: TrainingRun) -> None: ...


@dataclass(frozen=True)
class Registered:
    name: str
    cls: type
    order: int


HOOKS: dict[str, Registered] = {}


def register_hook(name: str, order: int = 100):
    """Class decorator: register a Hook subclass under `name` (built-ins and plugins alike)."""

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Hook)):
            raise TypeError(f"hook {name!r}: {cls!r} is not a genspec.train.hooks.Hook subclass")
        if name in HOOKS and HOOKS[name].cls is not cls:
            raise ValueError(f"a hook named {name!r} is already registered ({HOOKS[name].cls.__module__})")
        HOOKS[name] = Registered(name, cls, order)
        return cls

    return register


def registered() -> list[Registered]:
    return sorted(HOOKS.values(), key=lambda r: (r.order, r.name))


def preflight(spec) -> list[str]:
    """Every registered hook's pre-training check; the messages of those that fail."""
    from genspec.errors import RunError

    missing = []
    for entry in registered():
        try:
            entry.cls.preflight(spec)
        except RunError as exc:
            missing.append(str(exc))
    return missing


class Hooks:
    """The hooks attached to one run, with each event's listeners resolved once: the loop calls
    `hooks.step_end` etc., lists of bound methods (empty where no hook listens)."""

    def __init__(self, hooks: list[Hook]):
        self.attached = hooks
        for event in EVENTS:
            setattr(self, event, [getattr(h, event) for h in hooks if _overrides(h, event)])

    @classmethod
    def attach(cls, run: TrainingRun) -> "Hooks":
        return cls([hook for entry in registered() if (hook := entry.cls.attach(run)) is not None])

    def fire(self, event: str, *args) -> None:
        for listener in getattr(self, event):
            listener(*args)


def _overrides(hook: Hook, event: str) -> bool:
    return getattr(type(hook), event) is not getattr(Hook, event)
