"""Whole-step CUDA graphs (genspec/compiler/cuda_graphs.py, train.cuda_graphs).

On the CPU, `StepGraphs` runs with a stand-in backend that keeps CUDA's contract (a capture
records the step without running it; a replay runs the recorded step on the static buffers and
overwrites the static outputs), so its bookkeeping is checked for real on every machine: warm-up
counts, one capture per phase, batches loaded into the buffers, a smaller last batch run
eagerly, outputs that survive the next replay, and a failed capture. With a GPU, the tests at the
end compare real replayed steps with eager ones on the same seeds, for each kind of step the
shipped specs have; `GENSPEC_TEST_DEVICE=cuda pytest tests/test_specs.py` (benchmarks/gpu_check.sh)
runs every shipped spec with graphs on.
"""

from __future__ import annotations

import pytest
import torch

import genspec
from genspec.compiler.model import CAPTURABLE_OPTIMIZERS, Model, fast_path, make_optimizer
from genspec.errors import RunError
from genspec.compiler.cuda_graphs import StepGraphs
from genspec.experiments.stack import StackedRuns
from spec_helpers import (NORMED_AUTOENCODER, QUICKSTART, REPO, TINY_BEGAN, TINY_CONDITIONAL_GAN, TINY_WGAN_GP,
                          tiny_digits_vae)

CPU = torch.device("cpu")


class _RecordedStep:
    def __init__(self, run, packed):
        self.run, self.packed, self.ran_by_capture = run, packed, True


class CpuGraphs:
    """CUDA's capture-and-replay contract on the CPU. A CUDA capture records kernels without
    running them and the replay just after it is the step itself; here the capture runs the step
    (so that there are outputs to hand back) and that first replay is skipped: one step either way.
    Later replays run the recorded closure again, on the static input buffers it closed over, and
    copy its outputs into the static output vector, as a graph's kernels write into theirs."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.warm_runs = self.captures = 0

    def warm(self, run):
        self.warm_runs += 1
        return run()

    def capture(self, run):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        packed, layout = run()
        return _RecordedStep(run, packed), (packed, layout)

    def replay(self, recorded: _RecordedStep) -> None:
        if recorded.ran_by_capture:
            recorded.ran_by_capture = False
            return
        packed, _ = recorded.run()
        recorded.packed.copy_(packed)

    def failed(self) -> None:
        pass


def with_cpu_graphs(model: Model, backend: CpuGraphs, strict: bool = False) -> Model:
    model.graphs = StepGraphs(lambda i, x, y: model.step(model.phases[i], x, y), model._phase_params, CPU,
                              strict=strict, describe=model._describe_phase, backend=backend)
    return model


def batches(spec, sizes, seed: int = 1, labels: bool = False) -> list:
    g = torch.Generator().manual_seed(seed)
    low, high = spec.data.get("range", [0, 1])
    out = []
    for n in sizes:
        x = low + (high - low) * torch.rand(n, *spec.data_shape, generator=g)
        out.append((x, torch.randint(0, 10, (n,), generator=g) if labels else None))
    return out


def train(model: Model, data: list, seed: int = 2) -> list[dict]:
    torch.manual_seed(seed)  # the same noise for the eager and the replayed run
    return [{k: v.detach().float().cpu().clone() for k, v in model.train_step(i % len(model.phases), x, y).items()}
            for i, (x, y) in enumerate(data)]


def state(model: Model) -> dict:
    return {f"{part}.{k}": v.detach().float().cpu().clone() for part, module in
            (("networks", model.networks), ("priors", model.priors), ("states", model.states))
            for k, v in module.state_dict().items()}


def assert_same_run(a: tuple, b: tuple, exact: bool) -> None:
    (outs_a, state_a), (outs_b, state_b) = a, b
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert x.keys() == y.keys(), i
        for k in x:
            same = torch.equal(x[k], y[k]) if exact else torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6)
            assert same, f"step {i + 1}, {k}: {x[k]} against {y[k]}"
    for k in state_a:
        same = torch.equal(state_a[k], state_b[k]) if exact else torch.allclose(state_a[k], state_b[k], rtol=1e-5, atol=1e-6)
        assert same, f"{k}: largest difference {(state_a[k] - state_b[k]).abs().max()}"


def compare_with_eager(spec, data: list, backend: CpuGraphs) -> Model:
    """Trains an eager model and one stepping through `backend`'s graphs from the same seeds on the
    same batches, checks that their losses and weights agree to the bit, and returns the latter."""
    torch.manual_seed(0)
    eager = Model(spec, CPU)
    torch.manual_seed(0)
    graphed = with_cpu_graphs(Model(spec, CPU), backend)
    assert_same_run((train(eager, data), state(eager)), (train(graphed, data), state(graphed)), exact=True)
    return graphed


def load_text(tmp_path, text: str, sets=()) -> object:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return genspec.load(path, list(sets))


# ------------------------------------------------------------------ the switch

def test_graphs_are_on_for_one_cuda_process_and_off_elsewhere():
    train = {"precision": "auto", "channels_last": "auto", "fused": "auto", "compile": False}
    cuda = torch.device("cuda")
    assert fast_path(train, cuda).cuda_graphs is True
    assert fast_path({**train, "cuda_graphs": True}, cuda).cuda_graphs is True
    assert fast_path(train, CPU).cuda_graphs is False
    assert fast_path({**train, "cuda_graphs": True}, CPU).cuda_graphs is False  # nothing to capture on a CPU
    assert fast_path({**train, "cuda_graphs": False}, cuda).cuda_graphs is False
    assert fast_path(train, cuda, distributed=True).cuda_graphs is False  # DDP's hooks average inside backward
    assert fast_path({**train, "compile": True}, cuda).cuda_graphs is False  # torch.compile brings graphs of its own


def test_graphed_runs_get_capturable_optimisers():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw", "rmsprop", "sgd"):
        opt = make_optimizer(name, {"lr": 0.1}, params, capturable=True)
        assert opt.defaults.get("capturable", False) is (name in CAPTURABLE_OPTIMIZERS), name  # SGD keeps no step count
        assert not make_optimizer(name, {"lr": 0.1}, params).defaults.get("capturable")
    assert Model(genspec.load(QUICKSTART), CPU).graphs is None  # the CPU trains eagerly


def test_a_run_gets_graphs_where_its_fast_path_has_them_and_true_makes_them_strict():
    cuda = fast_path({}, torch.device("cuda"))

    def step(key, x, y):  # never called: no step is taken
        return {}

    for setting, strict in (("auto", False), (True, True)):
        graphs = StepGraphs.for_run(cuda, {"cuda_graphs": setting}, step, list, torch.device("cuda"), str)
        assert graphs.strict is strict
        assert graphs._backend is None  # no CUDA stream before the first step: evaluation-only models take none
    assert StepGraphs.for_run(fast_path({}, CPU), {"cuda_graphs": True}, step, list, CPU, str) is None


def test_true_with_compile_is_a_spec_error():
    with pytest.raises(genspec.SpecError) as info:
        genspec.load(QUICKSTART, ["train.compile=true", "train.cuda_graphs=true"])
    assert "train.cuda_graphs: true cannot combine with train.compile" in str(info.value)
    assert genspec.load(QUICKSTART, ["train.compile=true"]).train["cuda_graphs"] == "auto"  # off when compiling: no error


def test_a_checkpoint_of_a_graphed_run_resumes_with_this_runs_optimiser_settings():
    """A CUDA-graph run saves `capturable` in its optimiser groups; loaded on the CPU, where a
    capturable Adam refuses to step, the group keeps this run's own setting."""
    spec = genspec.load(QUICKSTART, ["train.fused=false"])
    saver = Model(spec, CPU)
    saver.train_step(0, torch.rand(8, *spec.data_shape))
    saved = saver.state_dict()
    for group in saved["optimizers"]["vae"]["param_groups"]:
        group["capturable"] = True  # as a CUDA-graph run writes it
    model = Model(spec, CPU)
    model.load_state_dict(saved)
    assert [g["capturable"] for g in model.objectives["vae"].optimizer.param_groups] == [False]
    model.train_step(0, torch.rand(8, *spec.data_shape))  # steps on the CPU


# ------------------------------------------------------------------ StepGraphs, on the CPU

def test_replayed_steps_train_exactly_as_eager_steps():
    """Warm-up, capture, replays on new batches, and an epoch's smaller last batch run eagerly in
    between: the same losses and weights as eager steps, bit for bit."""
    spec = genspec.load(QUICKSTART)
    data = batches(spec, [16] * 5 + [7] + [16] * 3)
    backend = CpuGraphs()
    graphed = compare_with_eager(spec, data, backend)
    assert backend.warm_runs == 2 and backend.captures == 1
    assert graphed.graphs.replays == 6  # 9 steps: 2 warm-up, 1 captured (its replay), 1 eager (7 examples), 5 replays


def test_each_phase_is_captured_once_after_its_own_warm_up(tmp_path):
    spec = genspec.load(REPO / "specs" / "dcgan.yaml", [
        "data.dataset=digits", "data.range=[0, 1]", "data.split={train: 64, test: 32}",
        "networks.gen.layers=[fc 2x2x8, relu, deconv 4 3x3 x2, relu, deconv 1 3x3 x2, sigmoid]",
        "networks.dis.layers=[conv 8 3x3 /2, lrelu 0.2, dropout 0.3, flatten, fc 1, sigmoid]", "train.batch_size=16"])
    assert len(spec.phases) == 2
    data = batches(spec, [16] * 10)
    backend = CpuGraphs()
    graphed = compare_with_eager(spec, data, backend)
    assert backend.warm_runs == 4 and backend.captures == 2 and graphed.graphs.replays == 6


def test_what_a_step_returns_survives_the_next_replay():
    spec = genspec.load(QUICKSTART)
    torch.manual_seed(0)
    model = with_cpu_graphs(Model(spec, CPU), CpuGraphs())
    returned = [model.train_step(0, x) for x, _ in batches(spec, [16] * 6)]
    kept = [{k: v.clone() for k, v in out.items()} for out in returned]
    model.train_step(0, torch.rand(16, *spec.data_shape))
    for out, copy in zip(returned, kept):
        assert all(torch.equal(out[k], copy[k]) for k in out)
    assert len({float(out["elbo"]) for out in returned}) == len(returned)  # each step's own value


def test_labels_are_loaded_into_the_graphs_buffers_too(tmp_path):
    spec = load_text(tmp_path, TINY_CONDITIONAL_GAN)
    data = batches(spec, [32] * 8, labels=True)
    compare_with_eager(spec, data, CpuGraphs())


def test_a_step_that_cannot_be_captured_goes_on_eagerly_with_a_note(capsys):
    spec = genspec.load(QUICKSTART)
    data = batches(spec, [16] * 5)
    graphed = compare_with_eager(spec, data, CpuGraphs(fail=RuntimeError("operation not permitted when stream is capturing")))
    err = capsys.readouterr().err
    assert ("genspec: the step of phase 1 (updating vae) cannot be captured as a CUDA graph (RuntimeError: operation "
            "not permitted when stream is capturing); the run goes on without CUDA graphs") in err
    assert graphed.graphs.given_up and graphed.graphs.replays == 0


def test_under_true_a_step_that_cannot_be_captured_stops_the_run():
    spec = genspec.load(QUICKSTART)
    model = with_cpu_graphs(Model(spec, CPU), CpuGraphs(fail=RuntimeError("CUDA error: operation not permitted")),
                            strict=True)
    for x, _ in batches(spec, [16] * 2):
        model.train_step(0, x)
    with pytest.raises(RunError, match=r"the step of phase 1 \(updating vae\) cannot be captured as a CUDA graph "
                                       r"\(RuntimeError: CUDA error: operation not permitted\); set train.cuda_graphs to auto or false"):
        model.train_step(0, torch.rand(16, *spec.data_shape))
    assert all(p.grad is None for p in model.objectives["vae"].params)  # nothing half-captured left behind


def test_stacked_replicas_replay_their_vmapped_step(tmp_path):
    path = tmp_path / "ae.yaml"
    path.write_text(NORMED_AUTOENCODER.replace("NORM", "bn"))
    specs = [genspec.load(path, [f"train.seed={s}"]) for s in (0, 1)]

    def stacked_run(graphed: bool):
        runs = StackedRuns(specs, CPU)
        if graphed:
            runs.graphs = StepGraphs(runs._step, runs._phase_params, CPU, backend=CpuGraphs())
        torch.manual_seed(3)
        outs = []
        for i in range(6):
            n = 32 if i != 3 else 9
            xs = torch.stack([s.train.x[i * 8:i * 8 + n] for s in runs.splits])
            outs.append({k: v.clone() for k, v in runs.step(0, xs, None).items()})
        return outs, {k: v.detach().clone() for k, v in {**runs.params, **runs.buffers}.items()}, runs

    eager_outs, eager_state, _ = stacked_run(False)
    graphed_outs, graphed_state, runs = stacked_run(True)
    assert runs.graphs.replays == 3  # 6 steps: 2 warm-up, the capture (its replay), an eager 9-example batch, 2 replays
    for a, b in zip(eager_outs, graphed_outs):
        assert all(torch.equal(a[k].float(), b[k]) for k in a)
    assert all(torch.equal(eager_state[k], graphed_state[k]) for k in eager_state)


# ------------------------------------------------------------------ real CUDA graphs

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests above use a stand-in)")
CUDA_CASES = {  # name -> (spec text or path, overrides, with labels)
    "vae": (tiny_digits_vae("vae"), [], False),
    "dcgan_vbn_dropout": (REPO / "specs" / "dcgan.yaml", [
        "data.dataset=digits", "data.range=[0, 1]", "data.split={train: 64, test: 32}",
        "networks.gen.layers=[fc 2x2x8, vbn, relu, deconv 4 3x3 x2, vbn, relu, deconv 1 3x3 x2, sigmoid]",
        "networks.dis.layers=[conv 8 3x3 /2, lrelu 0.2, dropout 0.3, flatten, fc 1, sigmoid]"], False),
    "began_state": (TINY_BEGAN, ["train.trace=[k]"], False),
    "wgan_gp_penalty": (TINY_WGAN_GP, [], False),
    "cgan_labels": (TINY_CONDITIONAL_GAN, [], True),
    "batch_norm": (NORMED_AUTOENCODER.replace("NORM", "bn"), [], False),
}


@cuda_only
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_graph_replays_equal_eager_steps(case, tmp_path):
    text, sets, labels = CUDA_CASES[case]
    sets = [*sets, "train.device=cuda", "train.batch_size=16"]
    spec = genspec.load(text, sets) if not isinstance(text, str) else load_text(tmp_path, text, sets)
    device = torch.device("cuda")
    cycle = [i for i, phase in enumerate(spec.phases) for _ in range(phase.repeat)]
    data = [(x.to(device), None if y is None else y.to(device))
            for x, y in batches(spec, [16] * (4 * len(cycle) + 6) + [5] + [16] * 3, labels=labels)]

    def run(graphed: bool):
        torch.manual_seed(0)
        model = Model(spec, device)
        assert model.graphs is not None and model.fast.cuda_graphs
        if not graphed:
            model.graphs = None  # the same model, capturable optimisers included, stepping eagerly
        torch.manual_seed(2)
        torch.cuda.manual_seed(2)
        outs = [{k: v.detach().float().cpu() for k, v in model.train_step(cycle[i % len(cycle)], x, y).items()}
                for i, (x, y) in enumerate(data)]
        return (outs, state(model)), model

    eager, _ = run(False)
    graphed, model = run(True)
    assert model.graphs.given_up is None and model.graphs.replays > 0
    assert_same_run(eager, graphed, exact=False)


@cuda_only
def test_cuda_graphs_of_stacked_replicas_equal_their_eager_steps(tmp_path):
    path = tmp_path / "wgan.yaml"
    path.write_text(TINY_WGAN_GP)
    specs = [genspec.load(path, [f"train.seed={s}", "train.device=cuda"]) for s in (0, 1, 2)]
    device = torch.device("cuda")

    def run(graphed: bool):
        runs = StackedRuns(specs, device)
        assert runs.graphs is not None
        if not graphed:
            runs.graphs = None
        torch.cuda.manual_seed(3)
        outs = []
        for i in range(20):
            xs = torch.stack([s.train.x[(i * 32) % 128:(i * 32) % 128 + 32] for s in runs.splits])
            outs.append({k: v.float().cpu() for k, v in runs.step(0 if i % 6 < 5 else 1, xs, None).items()})
        return outs, {k: v.detach().float().cpu() for k, v in runs.params.items()}, runs

    eager_outs, eager_params, _ = run(False)
    graphed_outs, graphed_params, runs = run(True)
    assert runs.graphs.given_up is None and runs.graphs.replays > 0
    for a, b in zip(eager_outs, graphed_outs):
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), (a, b)
    assert all(torch.allclose(eager_params[k], graphed_params[k], rtol=1e-5, atol=1e-6) for k in eager_params)
