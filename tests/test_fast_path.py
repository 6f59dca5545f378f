"""The fast path's switches (train.precision, channels_last, fused, compile) and the loop's
promise of no host-device synchronisation inside a step."""

from __future__ import annotations

import pytest
import torch

import genspec
from genspec.compiler.model import FastPath, Model, fast_path
from genspec.train.trace import StepTrace
from genspec.train.loop import FiniteWatch
from spec_helpers import REPO, cli_in_process

QUICKSTART = REPO / "specs" / "quickstart.yaml"
DCGAN_TINY = ["data.dataset=digits", "data.range=[0, 1]", "data.split={train: 64, test: 32}",
              "networks.gen.layers=[fc 2x2x8, relu, deconv 4 3x3 x2, relu, deconv 1 3x3 x2, sigmoid]",
              "networks.dis.layers=[conv 8 3x3 /2, lrelu 0.2, flatten, fc 1, sigmoid]",
              "evaluate={grids: [samples]}", "train.batch_size=16"]


def test_auto_switches_are_on_for_cuda_and_off_for_cpu():
    train = {"precision": "auto", "channels_last": "auto", "fused": "auto", "compile": False}
    assert fast_path(train, torch.device("cuda")) == FastPath(bf16=True, channels_last=True, fused=True, compile=False,
                                                                  cuda_graphs=True)
    assert fast_path(train, torch.device("cpu")) == FastPath(bf16=False, channels_last=False, fused=True, compile=False)
    assert fast_path({**train, "fused": False}, torch.device("cpu")).fused is False
    forced = {"precision": "bf16", "channels_last": True, "fused": True, "compile": True}
    assert fast_path(forced, torch.device("cpu")) == FastPath(True, True, True, True)
    assert fast_path({"precision": "fp32", "channels_last": False, "fused": False}, torch.device("cuda")).bf16 is False


def test_fused_kernels_are_taken_where_pytorch_has_them():
    from genspec.compiler.model import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw", "sgd"):
        assert make_optimizer(name, {"lr": 0.1}, params, fused=True).defaults["fused"] is True
        assert not make_optimizer(name, {"lr": 0.1}, params, fused=False).defaults.get("fused")
    assert "fused" not in make_optimizer("rmsprop", {"lr": 0.1}, params, fused=True).defaults  # it has no fused kernel
    model = Model(genspec.load(QUICKSTART), torch.device("cpu"))  # the default on CPU
    assert all(run.optimizer.defaults["fused"] for run in model.objectives.values())


def steps(spec, n: int = 4, seed: int = 0) -> tuple[list, dict]:
    torch.manual_seed(seed)
    model = Model(spec, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, *spec.data_shape, generator=g)
    losses = []
    for i in range(n):
        out = model.step(model.phases[i % len(model.phases)], x)
        losses.append({k: float(v) for k, v in out.items()})
    return losses, {k: v.detach().clone() for k, v in model.networks.state_dict().items()}


@pytest.mark.parametrize("setting", ["channels_last=true", "fused=true"])
def test_layout_and_fused_optimiser_keep_the_numbers(setting):
    base = genspec.load(REPO / "specs" / "dcgan.yaml", DCGAN_TINY + ["train.fused=false", "train.channels_last=false"])
    fast = genspec.load(REPO / "specs" / "dcgan.yaml", DCGAN_TINY + [f"train.{setting}"])
    (l0, w0), (l1, w1) = steps(base), steps(fast)
    for a, b in zip(l0, l1):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)
    assert all(torch.allclose(w0[k].float(), w1[k].float(), atol=1e-5) for k in w0)


def test_bf16_autocast_trains_with_losses_near_float32():
    (l32, _), (l16, _) = steps(genspec.load(QUICKSTART)), steps(genspec.load(QUICKSTART, ["train.precision=bf16"]))
    for a, b in zip(l32, l16):
        assert all(b[k] == pytest.approx(a[k], rel=0.05, abs=0.05) for k in a)


def test_bf16_run_end_to_end(tmp_path):
    rc, out, err = cli_in_process("run", QUICKSTART, "--out", tmp_path / "run", "--no-progress", "--set", "train.epochs=1",
                                  "--set", "train.precision=bf16", "--set", "train.max_steps=3")
    assert rc == 0, err


class HostReads:
    """Counts every way a tensor's value reaches Python (each one waits for the device)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_no_host_read_inside_the_steps_of_a_gan_with_trace_and_state(monkeypatch, tmp_path):
    spec = genspec.load(REPO / "specs" / "began.yaml", [
        "data.dataset=digits", "data.image_size=null", "latent.z.shape=[4]", "networks.dec.input=4",
        "networks.gen.layers=[fc 4x4x8, upsample 2, conv 1 3x3]", "networks.dec.layers=[fc 4x4x8, upsample 2, conv 1 3x3]",
        "networks.enc.layers=[conv 8 3x3 /2, flatten, fc 4]",
        "train.fused=auto"])  # fused, as by default: unfused Adam reads its step counter with .item()
    model = Model(spec, torch.device("cpu"))
    x = torch.rand(8, 1, 8, 8)
    watch, trace = FiniteWatch(), StepTrace([("k", "state/k"), ("m_global", "m_global")], "cpu")
    reads = HostReads(monkeypatch)
    for step in range(5):
        losses = model.step(model.phases[0], x)
        watch.record(step, losses)
        trace.record(step + 1, losses)
    assert reads.count == 0
    watch.check(1)  # the read-back, once per log interval
    assert reads.count > 0


def test_finite_watch_names_the_first_bad_step_when_read_later():
    from genspec.errors import RunError

    watch = FiniteWatch()
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        watch.record(step, {"ok": torch.tensor(0.5), "loss": torch.tensor(value)})
    with pytest.raises(RunError, match=r"loss 'loss' became nan at epoch 3, step 3; the run stopped \(the last checkpoint is kept\)"):
        watch.check(3)


def test_finite_watch_reports_the_earliest_step_across_phases():
    from genspec.errors import RunError

    watch = FiniteWatch()  # a GAN: the generator's phase goes bad first, the critic's later
    watch.record(0, {"d_loss": torch.tensor(1.0)})
    watch.record(1, {"g_loss": torch.tensor(float("inf"))})
    watch.record(2, {"d_loss": torch.tensor(float("nan"))})
    with pytest.raises(RunError, match=r"loss 'g_loss' became inf at epoch 1, step 2;"):
        watch.check(1)


# ---- bfloat16 autocast (the CUDA default), checked with CPU autocast: what must stay float32


def test_a_confident_discriminator_keeps_its_loss_and_gradient_under_bf16():
    """`fc 1, sigmoid` under autocast: a bfloat16 sigmoid rounds to exactly 1 past a logit of
    about 6.2, where the cross-entropy against 0 reads log(0) (clamped to 100) and the gradient
    vanishes. genspec's sigmoid runs in float32, so a logit of 7 keeps its loss of ~7 and its gradient ~1."""
    from genspec.compiler.model import build
    from genspec.compiler.ops import bce

    spec = genspec.load(REPO / "specs" / "dcgan.yaml", DCGAN_TINY)
    dis = build(spec)["dis"]
    x = torch.rand(4, *spec.data_shape)
    results = {}
    for enabled in (False, True):
        head = [m for m in dis.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(7.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            p = dis(x)
            loss = bce(p, 0.0)  # a fake's target: the discriminator is sure, and wrong
        (grad,) = torch.autograd.grad(loss, head.bias)
        assert p.dtype == torch.float32
        results[enabled] = (loss.item(), grad.item())
    assert results[True][0] == pytest.approx(results[False][0], rel=0.01) and results[False][0] == pytest.approx(7.0, rel=1e-3)
    assert results[True][1] == pytest.approx(results[False][1], rel=0.01) and results[False][1] > 0.99


def test_soft_labels_and_gaussian_noise_are_float32_beside_bfloat16_outputs():
    from genspec.compiler.layers import Gaussian
    from genspec.compiler.ops import SoftLabel

    p = torch.full((1000,), 0.5, dtype=torch.bfloat16)
    target = SoftLabel(0.9, swap=0.5, other=0.05).like(p)
    assert target.dtype == torch.float32 and set(target.unique().tolist()) == {torch.tensor(0.9).item(), torch.tensor(0.05).item()}
    mean = torch.zeros(1000, dtype=torch.bfloat16)
    z = Gaussian(mean, torch.zeros(1000)).rsample()
    assert z.dtype == torch.float32 and len(z.unique()) > 990  # bfloat16 noise would take a few hundred values
    double = torch.zeros(3, dtype=torch.float64)  # float64 (the tests' hand computations) stays float64
    assert SoftLabel(0.9).like(double).dtype == Gaussian(double, double).rsample().dtype == torch.float64


def test_epoch_sums_of_bfloat16_losses_are_kept_in_float32():
    from genspec.train.loop import add_losses

    sums, counts = {}, {}
    for _ in range(1000):
        add_losses(sums, counts, {"g_loss": torch.tensor(1.37, dtype=torch.bfloat16)})
    assert sums["g_loss"].dtype == torch.float32
    assert float(sums["g_loss"]) / counts["g_loss"] == pytest.approx(1.37, rel=1e-2)  # a bfloat16 sum gives 0.51


@pytest.mark.parametrize("saved_layout, loaded_layout", [(False, True), (True, False)])
def test_a_checkpoint_resumes_across_memory_layouts(saved_layout, loaded_layout):
    """A checkpoint from channels-last weights (CUDA's default) read into contiguous ones (CPU), and
    back: Adam's moments take the parameters' layout, and the next fused step is the one the saving
    model would have taken."""
    def model(channels_last: bool) -> Model:
        torch.manual_seed(0)
        return Model(genspec.load(REPO / "specs" / "dcgan.yaml", DCGAN_TINY + [f"train.channels_last={str(channels_last).lower()}"]),
                     torch.device("cpu"))

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    saver = model(saved_layout)
    for phase in saver.phases:
        saver.step(phase, x)
    loader = model(loaded_layout)
    loader.load_state_dict(saver.state_dict())
    for run in loader.objectives.values():
        for p in run.params:
            assert all(v.stride() == p.stride() for v in run.optimizer.state[p].values() if v.shape == p.shape)
    for m in (saver, loader):
        torch.manual_seed(5)
        m.step(m.phases[0], x)
    # Adam's moments follow the gradients smoothly (the weights themselves may differ by about a
    # learning rate where a gradient is near 0: the two layouts sum in different orders)
    for name, run in saver.objectives.items():
        other = loader.objectives[name]
        for p, q in zip(run.params, other.params):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(run.optimizer.state[p][key], other.optimizer.state[q][key], rtol=1e-3, atol=1e-6)


def test_gradient_penalty_trains_under_torch_compile():
    """The penalty's double backward cannot run through a compiled graph ("donated buffers ...
    require create_graph=False"): `gp` calls the critic's eager forward, the rest stays compiled."""
    tiny = [o for o in DCGAN_TINY if o.startswith(("data.", "networks.", "train."))]
    (eager, _), (compiled, _) = (steps(genspec.load(REPO / "specs" / "wgan_gp.yaml", tiny + [f"train.compile={flag}"]), n=2)
                                 for flag in ("false", "true"))
    for a, b in zip(eager, compiled):
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5) for k in a)


def test_channels_last_is_left_off_where_no_network_convolves():
    """Channels-last speeds up convolutions; for fully connected networks it is a copy of every
    image batch for nothing, so `auto` turns it on only where a network convolves."""
    from genspec.compiler.model import convolves

    auto = {"precision": "auto", "channels_last": "auto", "fused": "auto"}
    assert fast_path(auto, torch.device("cuda"), convolutional=False).channels_last is False
    assert fast_path({**auto, "channels_last": True}, torch.device("cuda"), convolutional=False).channels_last is True
    assert any(convolves(net) for net in genspec.load(REPO / "specs" / "dcgan.yaml").networks.values())
    assert not any(convolves(net) for net in genspec.load(QUICKSTART).networks.values())


def test_a_loaded_step_count_goes_where_pytorch_keeps_it():
    """A checkpoint loaded onto the GPU puts Adam's step count there; a non-fused Adam then reads
    it back for every parameter in every step (a wait for the device). Loading moves it back to
    the CPU; fused and capturable ones keep it beside their parameters, as PyTorch does."""
    from genspec.compiler.model import step_count_device

    cuda = torch.device("cuda")
    param = torch.nn.Parameter(torch.zeros(3))
    for kwargs, expected in (({"foreach": True}, "cpu"), ({"foreach": False}, "cpu"), ({"fused": True}, "cuda"),
                             ({"capturable": True}, "cuda")):
        group = torch.optim.Adam([param], lr=0.1, **kwargs).param_groups[0]
        assert step_count_device(group, cuda).type == expected, kwargs
    # and on a CPU run the loaded count stays a CPU tensor, for the fused default and the others
    for fused in (True, False):
        model = Model(genspec.load(QUICKSTART, [f"train.fused={str(fused).lower()}"]), torch.device("cpu"))
        model.step(model.phases[0], torch.rand(8, 1, 8, 8))
        model.load_state_dict(model.state_dict())
        steps = [s["step"] for run in model.objectives.values() for s in run.optimizer.state.values()]
        assert steps and all(s.device.type == "cpu" and float(s) == 1 for s in steps)
