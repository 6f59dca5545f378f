"""The validated spec: plain dataclasses that the graph, compile and train stages read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genspec.lang import plugins
from genspec.lang.loader import Document
from genspec.lang.shapes import NetworkInfo


@dataclass
class Latent:
    name: str
    shape: tuple
    prior: str  # a name in registry.PRIORS (built-in or a plugin's)
    prior_args: tuple = ()
    prior_kwargs: dict = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        """A flow prior, a codebook (or a plugin's trainable prior) has parameters, trained by the objective that lists the latent."""
        return self.prior in ("realnvp", "codebook") or (self.prior in plugins.PRIORS and plugins.PRIORS[self.prior].trainable)


def call_text(name: str, args) -> str:
    """A call with constant arguments as a spec writes it: normal(0, 0.02); a bare name without any."""
    return name + (f"({', '.join(f'{a:g}' for a in args)})" if args else "")


@dataclass
class Network:
    name: str
    input: tuple
    rows: list[dict]  # canonical rows
    info: NetworkInfo
    init: str = "default"
    init_args: tuple = ()
    input_source: str | None = None  # "x", a latent's name, or None for a bare shape
    # extra inputs joined by `concat` rows, in call order: name -> (shape, source "y" / latent / None)
    conditions: dict = field(default_factory=dict)

    @property
    def init_text(self) -> str:
        """The init as the spec writes it: normal(0, 0.02), or a bare name without arguments."""
        return call_text(self.init, self.init_args)


@dataclass
class State:
    """A value carried across steps (BEGAN's k): `update` is computed from the step's losses after
    the optimisers have stepped, then clamped to `low`..`high`. Loss expressions read its value."""

    name: str
    init: float
    update: object  # expression AST
    low: float = -math.inf
    high: float = math.inf


@dataclass
class Objective:
    name: str
    networks: list[str]
    minimize: object  # expression AST
    optimizer: str
    optimizer_args: dict = field(default_factory=dict)
    clip: float | None = None  # weight clipping after each optimiser step: parameters clamped to [-clip, clip]


@dataclass
class Phase:
    update: list[str]  # objective names
    repeat: int = 1
    epochs: tuple | None = None  # (first, last), 1-based inclusive
    batch: str = "next"  # "same": runs on the batch of the phase before it, in the same step

    def active(self, epoch: int) -> bool:
        return self.epochs is None or self.epochs[0] <= epoch <= self.epochs[1]


@dataclass
class Spec:
    name: str
    doc: Document  # the resolved document (plain data + locations)
    params: dict
    data: dict
    data_shape: tuple
    num_classes: int | None
    latents: dict[str, Latent]
    networks: dict[str, Network]
    graph: dict[str, object]  # tensor name -> AST
    losses: dict[str, object]  # loss name -> AST
    objectives: dict[str, Objective]
    train: dict
    phases: list[Phase]
    evaluate: dict
    labels: dict = field(default_factory=dict)  # name -> {value, swap, other}
    states: dict = field(default_factory=dict)  # name -> State
    graph_nx: object = None  # the networkx dependency graph, set by pipeline.load_spec
    plugins: tuple = ()  # the modules of the plugins the spec names, loaded by validate

    @property
    def file(self) -> str:
        return self.doc.file

    @property
    def raw(self) -> dict:
        return self.doc.data

    @property
    def source(self):
        return self.raw.get("source")

    def where(self, *path):
        return self.doc.where(path)
