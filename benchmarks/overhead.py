#!/usr/bin/env python
"""How much does genspec's compiled training step cost over the same loop written by hand?

For the MNIST VAE, the MNIST GAN and Larsen's VAE-GAN, this times N training steps of
genspec's `Model.train_step` against a hand-written PyTorch loop of the identical model (the same
initial weights, batches, optimisers and random draws) in one process, alternating blocks of
the two, and prints one JSON object per spec: steps per second of each and

    ratio = genspec steps/s / hand-written steps/s      (above 1: genspec is faster)

The timed hand loop is what one writes by hand (float32, PyTorch's default optimiser
implementation and layout); genspec runs its defaults (fused optimisers; on CUDA bfloat16
autocast, channels-last and whole steps replayed from CUDA graphs too). To show that both did the
same work, the same hand loop given genspec's fast path (its "twin", eager) then replays the steps
untimed, and its parameters must equal genspec's (`params_match`, `max_abs_diff`).

    .venv/bin/python benchmarks/overhead.py --quick          # a few minutes on a 2-core CPU
    .venv/bin/python benchmarks/overhead.py --only mnist_gan --steps 200 --threads 1

A "step" is what genspec's train loop calls a step: one `Model.train_step` of one phase on one
batch. The GAN's phases alternate (discriminator, then generator), each on its own batch,
exactly as genspec/train/loop.py cycles through `train.phases`.

This is a measurement script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's genspec, installed or not

# MNIST lives next to the checkout on the project's machines (as the tests assume).
if "GENSPEC_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["GENSPEC_DATA"] = str(ROOT.parent / "shared" / "data")

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import genspec
from genspec.compiler.model import Model, choose_device
from genspec.data.datasets import load_data
from genspec.compiler.cuda_graphs import WARMUP_STEPS

SEED = 0
OUT = ROOT / "reports" / "benchmarks" / "overhead.jsonl"
# Float summation order may differ between the loops (not on CPU in practice, but e.g. with
# cuDNN's algorithm choice); a real difference in the computation is far above this.
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------------------------
# The hand-written models: plain nn.Modules holding deep copies of the layers genspec built
# (so the initial weights are identical), the losses written out from the spec.
# ---------------------------------------------------------------------------------------


def layers(net: nn.Module) -> list[nn.Module]:
    """Deep copies of a genspec network's rows (Conv2d+BatchNorm+ReLU blocks, Linear, ...)."""
    return copy.deepcopy(list(net.rows))


class GaussianEncoder(nn.Module):
    """The encoder as one would write it: a conv/fc body and a linear head giving mean and
    log-variance. Its parameters are registered in genspec's row order, so the two state
    dicts line up value by value."""

    def __init__(self, net: nn.Module):
        super().__init__()
        rows = layers(net)
        self.body = nn.Sequential(*rows[:-1])
        self.head = rows[-1].linear  # genspec's `gaussian` row is one Linear of 2 x latent units

    def forward(self, x):
        mean, logvar = self.head(self.body(x).flatten(1)).chunk(2, dim=1)
        return mean, logvar


class FeatureDiscriminator(nn.Module):
    """A discriminator that also returns its features at one layer (Larsen's Dis_l), both from one pass."""

    def __init__(self, net: nn.Module, features_at: int):
        super().__init__()
        rows = layers(net)
        self.body = nn.Sequential(*rows[:features_at + 1])
        self.head = SigmoidDiscriminator(rows[features_at + 1:])

    def forward(self, x):
        """(logits, features): the losses need only the logits."""
        features = self.body(x)
        return self.head(features)[1], features


def rsample(mean, logvar):
    # float32 noise under bf16 autocast too, as genspec's Gaussian draws it (layers.full_precision)
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean, dtype=torch.promote_types(mean.dtype, torch.float32))


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dims, averaged over the batch."""
    return (0.5 * (logvar.exp() + mean.pow(2) - 1.0 - logvar)).flatten(1).sum(1).mean()


def squared_error(a, b):
    """Squared error summed per example, averaged over the batch (a Gaussian log-likelihood)."""
    return (a - b).pow(2).flatten(1).sum(1).mean()


def soft_targets(p, value, swap, other):
    """Soft labels: `value`, swapped to `other` for each example with probability `swap`."""
    target = torch.full_like(p, value)
    return torch.where(torch.rand_like(p) < swap, torch.full_like(p, other), target)


def bce(logits, target):
    """Binary cross-entropy of sigmoid(logits), computed from the logits in float32 outside
    autocast, as genspec computes bce of a network that ends in a sigmoid."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class SigmoidDiscriminator(nn.Module):
    """A discriminator that returns its logits and its probability (in float32, as genspec's
    network keeps both: the losses use the logits, the probability is the network's output)."""

    def __init__(self, rows: list[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(*rows)  # genspec's rows stop before the closing sigmoid

    def forward(self, x):
        logits = self.body(x)
        return torch.sigmoid(logits.float()), logits


class HandLoop:
    """What the hand-written loops share. With `fast=None` they are what one writes by hand:
    float32, PyTorch's default optimiser implementation and layout; this is the loop timed
    against genspec. Given genspec's FastPath they are its twin: the same fused optimiser
    kernels, channels-last layout and bfloat16 autocast, which is what the parameters after
    the steps are compared against (`params_match`)."""

    def __init__(self, model: Model, fast=None):
        self.fast = fast
        self.lr = model.spec.params["lr"]

    def adam(self, params) -> torch.optim.Optimizer:
        extra = {"fused": True} if self.fast and self.fast.fused else {}
        return torch.optim.Adam(params, lr=self.lr, **extra)

    def forward_pass(self):
        """The context of the forward pass and the losses (not of backward or the update)."""
        if self.fast and self.fast.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_phases(self, steps: list) -> None:
        self.device = next(next(iter(self.networks.values())).parameters()).device
        channels_last_on = bool(self.fast and self.fast.channels_last)
        layout = torch.channels_last if channels_last_on else torch.contiguous_format
        for net in self.networks.values():  # genspec's rule: networks with a convolution
            if any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in net.modules()):
                net.to(memory_format=layout)  # the copied layers came in genspec's layout
        if not channels_last_on:
            self.phases = steps
            return

        def channels_last(step):
            return lambda x: step(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

        self.phases = [channels_last(step) for step in steps]


class HandVAE(HandLoop):
    """specs/mnist_vae.yaml: elbo = sqerr(dec(z), x) + kl(q, z), one Adam over enc and dec."""

    def __init__(self, model: Model, fast=None):
        super().__init__(model, fast)
        self.enc = GaussianEncoder(model.networks["enc"])
        self.dec = nn.Sequential(*layers(model.networks["dec"]))
        self.opt = self.adam([*self.enc.parameters(), *self.dec.parameters()])
        self.networks = {"enc": self.enc, "dec": self.dec}
        self.optimizers = {"vae": self.opt}
        self.set_phases([self.step])

    def step(self, x):
        with self.forward_pass():
            mean, logvar = self.enc(x)
            z = rsample(mean, logvar)
            kl = kl_to_standard_normal(mean, logvar)
            rec = squared_error(self.dec(z), x)
            elbo = rec + kl
        self.opt.zero_grad(set_to_none=True)
        elbo.backward()
        self.opt.step()


class HandGAN(HandLoop):
    """specs/mnist_gan.yaml: a discriminator step, then a generator step (non-saturating
    loss), each on its own batch as genspec's phases are."""

    def __init__(self, model: Model, fast=None):
        super().__init__(model, fast)
        self.z_shape = tuple(model.spec.latents["z"].shape)
        self.gen = nn.Sequential(*layers(model.networks["gen"]))
        self.dis = SigmoidDiscriminator(layers(model.networks["dis"]))
        self.gen_params = list(self.gen.parameters())
        self.opt_d = self.adam(self.dis.parameters())
        self.opt_g = self.adam(self.gen_params)
        self.networks = {"gen": self.gen, "dis": self.dis}
        self.optimizers = {"dis": self.opt_d, "gen": self.opt_g}
        self.set_phases([self.dis_step, self.gen_step])  # train.phases: [{update: [dis]}, {update: [gen]}]

    def dis_step(self, x):
        with self.forward_pass():
            x_fake = self.gen(torch.randn(len(x), *self.z_shape, device=x.device))
            _, d_real = self.dis(x)  # logits
            _, d_fake = self.dis(x_fake.detach())  # the usual idiom: no gradient into the generator
            d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

    def gen_step(self, x):  # the batch is not read: the generator's loss sees only fakes
        with self.forward_pass():
            _, d_fake = self.dis(self.gen(torch.randn(len(x), *self.z_shape, device=x.device)))
            g_loss = bce(d_fake, torch.ones_like(d_fake))
        self.opt_g.zero_grad(set_to_none=True)
        # Gradients for the generator only: a plain backward() would also fill the
        # discriminator's .grad, work that its next zero_grad throws away.
        g_loss.backward(inputs=self.gen_params)
        self.opt_g.step()


class HandVAEGAN(HandLoop):
    """specs/larsen_vaegan.yaml, Algorithm 1: one forward pass, three losses, three updates.

        prior = kl(q, z) * beta
        llike = sqerr(Dis_l(x_rec), Dis_l(x)) / 2
        gan   = bce(d_real, real) + bce(d_rec, fake) + bce(d_p, fake)     (soft, swapped labels)
        enc minimises prior + llike, dec gamma * llike - gan, dis gan
    """

    def __init__(self, model: Model, fast=None):
        super().__init__(model, fast)
        spec = model.spec
        self.z_shape = tuple(spec.latents["z"].shape)
        self.gamma, self.beta = float(spec.params["gamma"]), float(spec.params["beta"])
        self.real, self.fake = spec.labels["real"], spec.labels["fake"]  # {value, swap, other}
        self.enc = GaussianEncoder(model.networks["enc"])
        self.dec = nn.Sequential(*layers(model.networks["dec"]))
        self.dis = FeatureDiscriminator(model.networks["dis"], model.networks["dis"].taps["features"])
        self.networks = {"enc": self.enc, "dec": self.dec, "dis": self.dis}
        self.params = {name: list(net.parameters()) for name, net in self.networks.items()}
        self.optimizers = {name: self.adam(self.params[name]) for name in self.networks}
        self.set_phases([self.step])

    def step(self, x):
        # The statements follow genspec's computation order (its graph's topological order), so
        # that the random draws (prior sample, reparameterisation, label swaps) and the batch
        # norm running statistics come out the same; the order changes no gradient.
        with self.forward_pass():
            mean, logvar = self.enc(x)
            x_p = self.dec(torch.randn(len(x), *self.z_shape, device=x.device))
            d_real, f_real = self.dis(x)
            z = rsample(mean, logvar)
            prior = kl_to_standard_normal(mean, logvar) * self.beta
            d_p, _ = self.dis(x_p)
            x_rec = self.dec(z)
            d_rec, f_rec = self.dis(x_rec)
            llike = squared_error(f_rec, f_real) / 2
            gan = bce(d_real, soft_targets(d_real, **self.real)) + bce(d_rec, soft_targets(d_rec, **self.fake)) + \
                bce(d_p, soft_targets(d_p, **self.fake))
            losses = {"enc": prior + llike, "dec": self.gamma * llike - gan, "dis": gan}
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        # Each loss moves only its own network (the feature loss must not move the discriminator),
        # and every gradient is taken before any weight changes: one forward pass, three updates.
        for i, (name, loss) in enumerate(losses.items()):
            loss.backward(inputs=self.params[name], retain_graph=i < len(losses) - 1)
        for opt in self.optimizers.values():
            opt.step()


BENCHMARKS = {
    # name: (spec file, hand-written loop, batch size for --quick or None for the spec's)
    "mnist_vae": ("specs/mnist_vae.yaml", HandVAE, None),
    "mnist_gan": ("specs/mnist_gan.yaml", HandGAN, None),
    "larsen_vaegan": ("specs/larsen_vaegan.yaml", HandVAEGAN, 8),
}
# Timed steps per loop: (default, --quick). On a 2-core CPU a step takes about 0.1 s (VAE),
# 2.5 s (GAN) and 4 s (Larsen at batch 8; far longer at its batch of 256). The default is sized
# for a GPU, where a small model's step takes milliseconds: blocks of 50 steps, so that the
# synchronisation closing each timed block is a small part of it.
STEPS = {"mnist_vae": (1000, 40), "mnist_gan": (500, 12), "larsen_vaegan": (60, 4)}


# ---------------------------------------------------------------------------------------
# Data: the same batch tensors, on the device, for both loops.
# ---------------------------------------------------------------------------------------

POOL = 32  # distinct batches held on the device; step i uses batch i % POOL


def make_batches(spec, batch_size: int, count: int, device) -> tuple[list, str]:
    g = torch.Generator().manual_seed(SEED)
    if spec.data["dataset"] in ("mnist", "fashion_mnist"):
        train = load_data(spec.data, SEED).train.x  # genspec's own loading: range [-1, 1], as a run sees it
        batches = [train[torch.randperm(len(train), generator=g)[:batch_size]] for _ in range(count)]
        source = f"{spec.data['dataset']} train split (genspec.data.datasets.load_data)"
    else:  # no CelebA needed to time Larsen's model: uniform noise of the data's shape and range
        batches = [torch.rand(batch_size, *spec.data_shape, generator=g) * 2 - 1 for _ in range(count)]
        source = f"synthetic uniform [-1, 1] {'x'.join(map(str, spec.data_shape))}"
    return [b.contiguous().to(device) for b in batches], source


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def genspec_phase_steps(model: Model, bookkeeping: bool) -> list:
    """One callable per entry of genspec's phase cycle (a phase with `repeat: k` appears k times):
    `Model.train_step`, the training loop's entry, which replays CUDA graphs where they are on."""
    cycle = [index for index, phase in enumerate(model.spec.phases) for _ in range(phase.repeat)]
    if not bookkeeping:
        return [lambda x, index=index: model.train_step(index, x) for index in cycle]
    import tempfile

    from genspec.compiler.distributed import SINGLE
    from genspec.experiments.run import register_builtin_hooks
    from genspec.train.hooks import Hooks, TrainingRun
    from genspec.train.loop import FiniteWatch  # the loop's device-side finiteness record

    register_builtin_hooks()  # the hooks a real run attaches, with their per-step listeners
    run = TrainingRun(model.spec, model, None, Path(tempfile.mkdtemp()), SINGLE, progress=False)
    hooks = Hooks.attach(run)
    sums: dict = {}
    finite = FiniteWatch()
    steps = iter(range(1, 10**9))

    def step_with_bookkeeping(x, index):  # what genspec/train/loop.py's _one_epoch adds around each step
        losses = model.train_step(index, x)
        finite.record(0, losses)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value
        for listener in hooks.after_update:
            listener(run, index, losses)
        step = next(steps)
        for listener in hooks.step_end:
            listener(run, step, losses)

    return [lambda x, index=index: step_with_bookkeeping(x, index) for index in cycle]


def run_block(phase_steps: list, batches: list, start: int, count: int, device) -> float:
    """Steps start .. start+count-1 (phase i % cycle, batch i % pool), seeded by `start`. Seconds."""
    torch.manual_seed(SEED + start)  # both loops draw the same random numbers in the same order
    sync(device)
    began = time.perf_counter()
    for i in range(start, start + count):
        phase_steps[i % len(phase_steps)](batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - began


def compare_state(model: Model, hand) -> dict:
    """Parameters (and, separately, buffers such as batch norm running statistics) of both loops."""
    out = {"param": [], "buffer": []}
    for name, net in model.networks.items():
        ours = net.state_dict()
        theirs = hand.networks[name].state_dict()
        if [v.shape for v in ours.values()] != [v.shape for v in theirs.values()]:
            raise SystemExit(f"{name}: the hand-written network's tensors do not line up with genspec's")
        params = {key for key, _ in net.named_parameters()}
        for (key, a), b in zip(ours.items(), theirs.values()):
            if a.is_floating_point():
                same = torch.allclose(a, b, rtol=RTOL, atol=ATOL)
                diff = (a - b).abs().max().item() if a.numel() else 0.0
            else:  # num_batches_tracked
                same, diff = bool(torch.equal(a, b)), float((a - b).abs().max())
            out["param" if key in params else "buffer"].append((same, diff))
    return {"params_match": all(s for s, _ in out["param"]), "max_abs_diff": max(d for _, d in out["param"]),
            "buffers_match": all(s for s, _ in out["buffer"]),
            "buffers_max_abs_diff": max((d for _, d in out["buffer"]), default=0.0)}


# How PyTorch carries out an update, not which update: the timed hand loop keeps PyTorch's
# default (what one writes by hand), genspec may take a fused kernel.
IMPLEMENTATION_KEYS = ("params", "fused", "foreach", "capturable")


def optimizer_settings(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS} for g in opt.param_groups]


def optimizer_implementation(opt: torch.optim.Optimizer) -> str:
    group = opt.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "default"


def check_same_optimizers(model: Model, hand) -> None:
    """The hand-written optimisers must be genspec's classes with genspec's settings (learning
    rate, betas, ...); only the implementation (fused kernel or not) may differ."""
    for name, run in model.objectives.items():
        ours, theirs = run.optimizer, hand.optimizers[name]
        if type(ours) is not type(theirs) or optimizer_settings(ours) != optimizer_settings(theirs):
            raise SystemExit(f"objective {name}: hand-written optimiser {theirs!r} differs from genspec's {ours!r}")
        if sum(p.numel() for p in run.params) != sum(p.numel() for g in theirs.param_groups for p in g["params"]):
            raise SystemExit(f"objective {name}: the hand-written optimiser moves other parameters than genspec's")


def schedule(steps: int, cycle: int, rounds: int) -> tuple[int, int]:
    """(rounds, steps per block): blocks of whole phase cycles (a GAN block holds as many dis
    steps as gen steps), at least `steps` in all. Many short blocks rather than a few long
    ones, so that load from other processes falls on both loops alike."""
    rounds = max(1, min(rounds, steps // cycle))
    block = -(-steps // (rounds * cycle)) * cycle  # rounded up to whole cycles
    return -(-steps // block), block


def replay(phase_steps: list, batches: list, warmup: int, rounds: int, block: int, device) -> None:
    """The steps `time_alternating` ran, in the same blocks (so with the same seeds), untimed."""
    run_block(phase_steps, batches, 0, warmup, device)
    for r in range(rounds):
        run_block(phase_steps, batches, warmup + r * block, block, device)


def on_fast_path(fast) -> bool:
    """Whether genspec's switches change the computation from PyTorch's defaults (compile aside)."""
    return fast.bf16 or fast.channels_last or fast.fused


def describe(fast) -> str:
    on = [label for label, flag in (("bf16 autocast", fast.bf16), ("channels-last", fast.channels_last),
                                    ("fused optimisers", fast.fused), ("torch.compile", fast.compile),
                                    ("CUDA graphs", fast.cuda_graphs)) if flag]
    return ", ".join(on) or "float32, PyTorch's defaults"


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched below autograd (forward, backward and update) that do
    work. On a GPU each is a kernel launch, or a few (a foreach or fused optimiser operator
    launches one per chunk of tensors), so for a small model, where the launches and not the
    arithmetic set the pace, this is what a step costs. Views, detach, dtype queries and
    uninitialised allocations launch nothing and are left out."""

    NO_WORK = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
               "aten::_unsafe_view"}  # a view that the schema does not mark as one

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.does_work(func, out):
            self.count += 1
        return out

    def does_work(self, func, out) -> bool:
        if func.is_view or func.name().split(".")[0] in self.NO_WORK:
            return False
        # in-place operators that return nothing (foreach and fused optimiser updates) write their arguments
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        returns = torch.is_tensor(out) or (isinstance(out, (tuple, list)) and any(torch.is_tensor(o) for o in out))
        return writes or returns


def run_cycle(phase_steps: list, batches: list) -> None:
    """One phase cycle, batch i for phase step i, untimed and unseeded."""
    for i, phase_step in enumerate(phase_steps):
        phase_step(batches[i % len(batches)])


def count_work(loops: dict, batches: list, device) -> dict:
    """What one phase cycle of each loop dispatches: ATen operators (`OperatorCount`), and Python
    and builtin function calls (sys.setprofile, this thread), the host-side work around the same
    operators that a GPU's small steps wait for. Run after the parameters are compared: the extra
    cycles change them."""
    work = {}
    for label, phase_steps in loops.items():
        torch.manual_seed(SEED)
        with OperatorCount() as counter:
            run_cycle(phase_steps, batches)
        calls = 0

        def profiler(frame, event, arg):
            nonlocal calls
            calls += event in ("call", "c_call")

        torch.manual_seed(SEED)
        sys.setprofile(profiler)  # around the steps alone: seeding's first calls vary
        try:
            run_cycle(phase_steps, batches)
        finally:
            sys.setprofile(None)
        sync(device)
        work[label] = {"operators": counter.count, "python_calls": calls}
    return work


def time_alternating(loops: dict, batches: list, warmup: int, rounds: int, block: int, device, name: str) -> tuple:
    """Seconds per block of each loop, and on CUDA each loop's peak bytes allocated over its blocks
    above what was allocated as the block began: its activations, gradients and workspaces, not
    what both loops hold throughout (weights, optimiser state, the batch pool; `resident_mib`).
    Block r of every loop runs the same steps on the same batches."""
    for phase_steps in loops.values():  # untimed: first-call allocations, lazy initialisation, caches
        run_block(phase_steps, batches, 0, warmup, device)
    times = {label: [] for label in loops}
    peaks = {label: 0 for label in loops}
    for r in range(rounds):
        start = warmup + r * block
        # Alternate which loop goes first, so neither always runs on a cooler / warmer machine.
        order = list(loops.items()) if r % 2 == 0 else list(loops.items())[::-1]
        for label, phase_steps in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            times[label].append(run_block(phase_steps, batches, start, block, device))
            if device.type == "cuda":
                peaks[label] = max(peaks[label], torch.cuda.max_memory_allocated(device) - before)
        log(f"  {name} round {r + 1}/{rounds}: " + ", ".join(f"{label} {block / t[-1]:.3g} steps/s"
                                                           for label, t in times.items()))
    return times, peaks


def benchmark(name: str, args, device) -> dict:
    spec_file, hand_class, quick_batch = BENCHMARKS[name]
    spec = genspec.load(ROOT / spec_file, args.set)
    batch_size = args.batch_size or (args.quick and quick_batch) or spec.train["batch_size"]

    torch.manual_seed(SEED)  # as genspec/train/loop.py does before building the model
    model = Model(spec, device)
    model.train(True)
    hand = hand_class(model)  # deep copies: the same initial weights; PyTorch's defaults
    # What the parameters are checked against: the same loop on genspec's fast path, or the timed
    # loop itself where that fast path is PyTorch's defaults
    twin = hand_class(model, model.fast) if on_fast_path(model.fast) else hand
    check_same_optimizers(model, hand)
    loops = {"genspec": genspec_phase_steps(model, args.bookkeeping), "hand": hand.phases}
    cycle = len(hand.phases)
    if len(loops["genspec"]) != cycle:
        raise SystemExit(f"{name}: genspec cycles through {len(loops['genspec'])} phase steps, the hand loop {cycle}")

    rounds, block = schedule(args.steps or STEPS[name][1 if args.quick else 0], cycle, args.rounds)
    steps = rounds * block
    # untimed: each phase's eager warm-up steps and its CUDA-graph capture, and two cycles more
    warmup = args.warmup if args.warmup is not None else (WARMUP_STEPS + 3) * cycle
    batches, source = make_batches(spec, batch_size, min(POOL, warmup + steps), device)
    load_before = os.getloadavg()[0]
    log(f"{name}: batch {batch_size}, {warmup} warm-up + {steps} timed steps per loop in {rounds} rounds of {block}")
    times, peaks = time_alternating(loops, batches, warmup, rounds, block, device, name)
    if twin is not hand:
        log(f"  {name}: the same steps untimed, by the hand loop on genspec's fast path ({describe(model.fast)})")
        replay(twin.phases, batches, warmup, rounds, block, device)

    same_as_twin, plain = compare_state(model, twin), compare_state(model, hand)
    work = count_work(loops, batches, device)
    genspec_rate, hand_rate = steps / sum(times["genspec"]), steps / sum(times["hand"])
    round_ratios = [h / g for g, h in zip(times["genspec"], times["hand"])]  # per round: genspec rate / hand rate
    return {
        "benchmark": "overhead",
        "spec": name,
        "spec_file": spec_file,
        "genspec_loop": "Model.train_step + the loop's bookkeeping and hook dispatch" if args.bookkeeping else "Model.train_step",
        **environment(device),
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "rounds": rounds,
        "data": source,
        "optimizers": {"genspec": sorted({optimizer_implementation(r.optimizer) for r in model.objectives.values()}),
                       "hand": sorted({optimizer_implementation(o) for o in hand.optimizers.values()})},
        "genspec_steps_per_s": round(genspec_rate, 4),
        "hand_steps_per_s": round(hand_rate, 4),
        "ratio": round(genspec_rate / hand_rate, 4),
        # The headline ratio uses total times. On a busy machine the rounds scatter (see
        # loadavg: the 1-minute load before and after), and the median round ratio and the
        # ratio of each loop's best round are the steadier figures.
        "round_ratios": [round(r, 4) for r in round_ratios],
        "median_round_ratio": round(statistics.median(round_ratios), 4),
        "best_round_ratio": round(min(times["hand"]) / min(times["genspec"]), 4),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        # CUDA only: each loop's peak memory above what was allocated as its block began (activations,
        # gradients, workspaces), and what stays allocated throughout (both loops' weights and
        # optimiser state, the twin, the batch pool)
        **({"genspec_peak_mib": round(peaks["genspec"] / 2**20, 1), "hand_peak_mib": round(peaks["hand"] / 2**20, 1),
            "resident_mib": round(torch.cuda.memory_allocated(device) / 2**20, 1)} if device.type == "cuda" else {}),
        "fast_path": describe(model.fast),
        # Against the hand loop given the same fast path (the twin): do both compute the same?
        **same_as_twin,
        # Against the timed plain loop: fused kernels and autocast change the float order, and Adam,
        # which divides by the root of the gradients' second moment, magnifies that where a gradient is near 0.
        "plain_max_abs_diff": plain["max_abs_diff"],
        # Deterministic, whatever the machine's load: the work each loop dispatches per phase cycle
        **{f"{label}_{kind}_per_cycle": n for label, counts in work.items() for kind, n in counts.items()},
        "steps_compared": warmup + steps,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "quick": bool(args.quick),
        "deterministic": bool(args.deterministic),
        "overrides": args.set,
    }


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def environment(device) -> dict:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": machine, "genspec_commit": git_commit(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    """HEAD of the checkout, with '+dirty' when genspec/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "genspec"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes on a 2-core CPU)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="SPEC",
                        help=f"benchmark only this spec (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--steps", type=int, help="timed steps per loop (default: per spec, fewer with --quick)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the spec's; 8 for Larsen with --quick)")
    parser.add_argument("--rounds", type=int, default=20, help="alternating blocks of each loop (default 20)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (default: five phase cycles, which cover CUDA-graph capture)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--bookkeeping", action="store_true",
                        help="time genspec's step with the loop's per-step loss check, sums and hook dispatch around it")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels for both loops (cuDNN and cuBLAS pick order-stable "
                             "algorithms), so that params_match is exact on CUDA too; may slow both")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a genspec override applied to every spec (e.g. params.lr=1e-3)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"JSON lines are appended here (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, after this
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such kernel warns, not fails
        torch.backends.cudnn.benchmark = False
    device = choose_device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BENCHMARKS):
        result = benchmark(name, args, device)
        line = json.dumps(result)
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
        log(f"{name}: genspec {result['genspec_steps_per_s']:.3g} steps/s, hand {result['hand_steps_per_s']:.3g} "
            f"steps/s, ratio {result['ratio']:.3f}, params_match {result['params_match']} "
            f"(max abs diff {result['max_abs_diff']:.2g})")


if __name__ == "__main__":
    main()
