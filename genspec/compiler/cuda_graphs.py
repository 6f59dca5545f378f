"""Whole training steps as CUDA graphs: one launch per step instead of one per kernel.

The papers' models are small. On a GPU their steps are bound by the host, not the device: a
step of the MNIST VAE is about 90 kernels (forward, backward, Adam), and Python, the dispatcher
and the launches take about 5 ms for them on an H200 while the kernels themselves take a
fraction of that. A CUDA graph records a step's kernels once and replays them with one launch,
so a replayed step costs roughly what its kernels cost.

`StepGraphs` wraps a step function `step(key, x, y) -> {name: tensor}` (a phase of
`compile.Model`, or of the stacked replicas in `stack.StackedRuns`). Each key (phase) first runs
eagerly `warmup` times on a side stream, which creates the optimiser state and lets cuBLAS and
cuDNN make their lazy choices; its next step is captured into a graph with static input
buffers, and every later step of that key copies its batch into the buffers and replays. The
replay is the same computation as the eager step: the same kernels on the same tensors, and the
random draws continue the default generator's stream as eager steps would (PyTorch hands a
captured graph its philox offsets at every replay). Optimisers must be built with
`capturable=True` (`compile.make_optimizer`) so that their step counts live on the device.

A batch of another shape (an epoch's last, smaller batch) runs eagerly; the graph is kept for
the next full batch. A step that cannot be captured (an op that waits for the device, say) is
run eagerly instead, and graphs stop for the run: under `train.cuda_graphs: auto` with a note,
under `true` as a RunError that names the phase.

The outputs a replay writes are static: the next replay overwrites them. They are packed into
one float32 vector inside the graph and cloned once after each replay, so a caller may keep
what a step returns (one copy kernel, not one per loss).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from genspec.errors import RunError

WARMUP_STEPS = 2  # eager steps of each phase before its capture


@dataclass
class _Captured:
    graph: object
    x: torch.Tensor
    y: torch.Tensor | None
    packed: torch.Tensor  # the step's outputs, flattened into one float32 vector (written by the graph)
    layout: list  # (name, shape) of each output, in packed order

    def fits(self, x: torch.Tensor, y) -> bool:
        return x.shape == self.x.shape and (y is None) == (self.y is None) and (y is None or y.shape == self.y.shape)

    def load(self, x: torch.Tensor, y) -> None:
        self.x.copy_(x, non_blocking=True)
        if y is not None:
            self.y.copy_(y, non_blocking=True)

    def outputs(self) -> dict[str, torch.Tensor]:
        flat = self.packed.clone()  # the one copy: views of it below cost no kernel
        out, start = {}, 0
        for name, shape in self.layout:
            size = math.prod(shape)
            out[name] = flat[start:start + size].view(shape)
            start += size
        return out


def pack(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """A step's outputs as one float32 vector and the (name, shape) of each part."""
    layout = [(name, tuple(value.shape)) for name, value in out.items()]
    flat = torch.cat([value.detach().float().reshape(-1) for value in out.values()]) if out else torch.zeros(0)
    return flat, layout


class CudaBackend:
    """The CUDA side of `StepGraphs`: a side stream for warm-up steps and captures. Each call is
    made with the run's GPU current, since captures and replays go to the current device's
    streams (a tuning worker trains on cuda:1 while cuda:0 stays current)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def warm(self, run):
        """An eager step on the side stream, as PyTorch's capture recipe warms up."""
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = run()
            torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, run):
        """Record `run`'s kernels (nothing executes); returns (graph, what run returned)."""
        with torch.cuda.device(self.device):
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(torch.cuda.current_stream())
            # thread_local: a DataLoader's pin-memory thread may call CUDA meanwhile, which is no part of the step
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                out = run()
        return graph, out

    def replay(self, graph) -> None:
        with torch.cuda.device(self.device):
            graph.replay()

    def failed(self) -> None:
        """After a capture that raised: wait for the device so that the eager step starts clean."""
        torch.cuda.synchronize(self.device)


class StepGraphs:
    """Captures each key's step after `warmup` eager runs and replays it from then on.

    `params(key)`: the parameters the key's step updates; their gradients are set to None before
    the capture (so that the captured backward writes them rather than adding to them) and after
    a failed one. `strict`: a failed capture is a RunError instead of a fall back to eager steps.
    """

    def __init__(self, step, params, device: torch.device, warmup: int = WARMUP_STEPS, strict: bool = False,
                 describe=str, backend=None):
        self.step = step
        self.params = params
        self.device = device
        self.warmup = warmup
        self.strict = strict
        self.describe = describe  # key -> words for messages ("phase 1 (dis)")
        self._backend = backend
        self.captured: dict = {}
        self.eager_runs: Counter = Counter()
        self.replays = 0
        self.given_up: str | None = None  # why graphs stopped for this run

    @classmethod
    def for_run(cls, fast, train: dict, step, params, device: torch.device, describe) -> StepGraphs | None:
        """The graphs of a run's steps where its fast path has them on (`compile.fast_path`), else None;
        `train.cuda_graphs: true` makes a failed capture an error."""
        if not fast.cuda_graphs:
            return None
        return cls(step, params, device, strict=train.get("cuda_graphs") is True, describe=describe)

    @property
    def backend(self):
        # made at the first step: a model that never trains (evaluation, a stacked run's per-seed
        # copies) takes no CUDA stream
        if self._backend is None:
            self._backend = CudaBackend(self.device)
        return self._backend

    def __call__(self, key, x: torch.Tensor, y=None) -> dict[str, torch.Tensor]:
        if self.given_up is not None:
            return self.step(key, x, y)
        entry = self.captured.get(key)
        if entry is not None:
            if not entry.fits(x, y):  # an epoch's last, smaller batch: the graph stays for the next full one
                return self.step(key, x, y)
            entry.load(x, y)
            self.backend.replay(entry.graph)
            self.replays += 1
            return entry.outputs()
        if self.eager_runs[key] < self.warmup:
            self.eager_runs[key] += 1
            return self.backend.warm(lambda: self.step(key, x, y))
        return self._capture(key, x, y)

    def _capture(self, key, x: torch.Tensor, y) -> dict[str, torch.Tensor]:
        static_x, static_y = x.clone(), None if y is None else y.clone()
        self._clear_gradients(key)

        def run():
            return pack(self.step(key, static_x, static_y))

        try:
            with warnings.catch_warnings():
                # capturable optimisers warn when they step outside a graph: here they do by design
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                graph, (packed, layout) = self.backend.capture(run)
        except Exception as exc:  # whatever the op was that a graph cannot hold
            self.backend.failed()
            self._clear_gradients(key)
            reason = f"{self.describe(key)} cannot be captured as a CUDA graph ({type(exc).__name__}: " \
                     f"{str(exc).splitlines()[0] if str(exc) else 'no message'})"
            if self.strict:
                raise RunError(f"{reason}; set train.cuda_graphs to auto or false") from None
            self.given_up = reason
            print(f"genspec: {reason}; the run goes on without CUDA graphs", file=sys.stderr, flush=True)
            return self.step(key, x, y)
        entry = self.captured[key] = _Captured(graph, static_x, static_y, packed, layout)
        self.backend.replay(graph)  # capturing executed nothing: this is the step itself
        self.replays += 1
        return entry.outputs()

    def _clear_gradients(self, key) -> None:
        for param in self.params(key):
            param.grad = None
