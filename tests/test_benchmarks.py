"""benchmarks/overhead.py's deterministic figure: the operators each loop dispatches per cycle."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import genspec
from genspec.compiler.model import Model
from spec_helpers import REPO


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead", REPO / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_count_takes_work_and_leaves_views_out(overhead):
    x = torch.randn(4, 3)
    with overhead.OperatorCount() as counter:
        y = (x * 2 + 1).t().reshape(-1)  # mul, add, and a copy (the transpose is a view, the reshape copies)
        torch.empty_like(y)  # an uninitialised allocation launches nothing
        y.detach().view(3, 4).sum()  # sum
    assert counter.count == 4
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    for implementation in ("foreach", "fused"):  # their operators update in place and return nothing
        optimizer = torch.optim.Adam(params, **{implementation: True})
        optimizer.step()  # the first: state created
        with overhead.OperatorCount() as counter:
            optimizer.step()
        assert counter.count >= 2, implementation  # the step count's increment and the update itself


def test_python_calls_are_counted_per_phase_step(overhead):
    def helper():
        return len([])  # one Python call and one builtin call

    def step(n):
        return lambda x: [helper() for _ in range(n)]

    work = overhead.count_work({"one": [step(1)], "four": [step(4)], "both": [step(1), step(4)]},
                               [torch.zeros(1)], torch.device("cpu"))
    counts = {label: w["python_calls"] for label, w in work.items()}
    assert counts["four"] - counts["one"] == 3 * 2  # three more helper() calls, each with its len()
    assert counts["both"] > counts["four"]  # a cycle of two phase steps counts both


@pytest.mark.parametrize("name", ["mnist_vae", "mnist_gan"])
def test_genspec_dispatches_what_the_hand_loop_does(overhead, name):
    """Like for like (PyTorch's default optimiser), genspec's step dispatches exactly the hand
    loop's operators: the graph, closures and bookkeeping around it add Python calls, no work.
    Its fused default replaces Adam's per-tensor operators."""
    spec_file, hand_class, _ = overhead.BENCHMARKS[name]
    counts = {}
    for fused in (False, True):
        spec = genspec.load(REPO / spec_file, ["train.device=cpu", f"train.fused={str(fused).lower()}"])
        torch.manual_seed(0)
        model = Model(spec, torch.device("cpu"))
        hand = hand_class(model)
        loops = {"genspec": overhead.genspec_phase_steps(model, False), "hand": hand.phases}
        batches = [torch.rand(4, *spec.data_shape) * 2 - 1 for _ in range(2)]
        overhead.run_cycle(loops["genspec"], batches)  # first steps: optimiser state created
        overhead.run_cycle(loops["hand"], batches)
        counts[fused] = {label: w["operators"] for label, w in overhead.count_work(loops, batches, model.device).items()}
    assert counts[False]["genspec"] == counts[False]["hand"] > 100
    assert counts[True]["hand"] == counts[False]["hand"]
    assert counts[True]["genspec"] < counts[False]["genspec"] / 2


def test_the_hand_loops_noise_is_float32_under_bfloat16(overhead):
    """genspec's Gaussian draws float32 noise beside bfloat16 outputs (layers.full_precision); the
    fast-path twin must draw the same, or its parameters drift from genspec's for no reason."""
    mean = torch.zeros(4, 3, dtype=torch.bfloat16)
    torch.manual_seed(0)
    z = overhead.rsample(mean, torch.zeros_like(mean))
    torch.manual_seed(0)
    assert z.dtype == torch.float32 and torch.equal(z, torch.randn(4, 3))
