"""Pieces of the GAN family: the gradient-penalty op, virtual batch norm, and the DCGAN/WGAN-GP specs."""

import torch
from torch import nn

import genspec
from genspec.compiler.model import Env, Model
from genspec.compiler.layers import VirtualBatchNorm, build_network
from genspec.compiler.ops import gradient_penalty
from genspec.lang.rows import parse_row
from genspec.lang.shapes import infer_network
from genspec.lang.spec import Network
from spec_helpers import TINY_DIGITS_CLASSIFIER


def test_gradient_penalty_matches_a_hand_computation():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 1))
    real, fake = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    torch.manual_seed(1)
    got = gradient_penalty(critic, real, fake)
    torch.manual_seed(1)
    e = torch.rand(6, 1, 1, 1)
    want = []
    for i in range(6):  # one example at a time, with autograd's plain gradient
        x_hat = (e[i] * real[i] + (1 - e[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
        want.append((g.norm() - 1) ** 2)
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-6)
    assert got.requires_grad  # it trains the critic: the penalty's graph is kept


def test_gradient_penalty_is_measured_without_grad_in_evaluation():
    critic = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    with torch.no_grad():
        value = gradient_penalty(critic, torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2))
    assert value.item() >= 0 and not value.requires_grad


def test_the_functional_penalty_under_vmap_is_each_critics_own():
    """Stacked replicas take the penalty inside vmap through torch.func.vjp: with the same e drawn
    (randomness="same" against the same seed), its value and the critic's parameter gradients (the
    second derivative) are those of autograd.grad on each critic alone."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    critics = [nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 1)) for _ in range(3)]
    real, fake = torch.randn(3, 6, 3, 2, 2), torch.randn(3, 6, 3, 2, 2)
    params, _ = stack_module_state(critics)
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    base = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 1)).to("meta")

    def one(p, r, f):
        return gradient_penalty(lambda x: functional_call(base, p, (x,)), r, f, functional=True)

    torch.manual_seed(7)
    stacked = vmap(one, randomness="same")(params, real, fake)
    stacked.sum().backward()
    for k, critic in enumerate(critics):
        torch.manual_seed(7)
        alone = gradient_penalty(critic, real[k], fake[k])
        alone.backward()
        assert torch.allclose(stacked[k], alone, atol=1e-6)
        for (name, grad), p in zip(params.items(), critic.parameters()):
            if p.grad is None:  # the last bias: the input gradient does not depend on it
                assert grad.grad is None or torch.all(grad.grad[k] == 0), name
            else:
                assert torch.allclose(grad.grad[k], p.grad, atol=1e-6), name
    assert params["1.weight"].grad.abs().sum() > 0


def _generator():
    rows = [parse_row(r) for r in ["fc 4x4x8, vbn, relu", "deconv 4 3x3 x2, vbn, relu", "deconv 1 3x3 x2, tanh"]]
    return build_network(Network("g", (6,), rows, infer_network((6,), rows)))


def test_virtual_batch_norm_makes_examples_independent_of_their_batch():
    torch.manual_seed(0)
    gen = _generator()
    z = torch.randn(5, 6)
    alone = gen(z[:1])
    assert torch.allclose(gen(z)[:1], alone, atol=1e-6)  # batch norm would mix the five
    assert gen(z).shape == (5, 1, 16, 16)


def test_virtual_batch_norm_reference_batch_is_fixed_across_steps():
    torch.manual_seed(0)
    gen = _generator()
    reference = gen.reference.clone()
    opt = torch.optim.Adam(gen.parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        gen(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(gen.reference, reference)
    assert "reference" in gen.state_dict()  # saved with the checkpoint, so a resume keeps it
    norms = [m for m in gen.modules() if isinstance(m, VirtualBatchNorm)]
    assert len(norms) == 2 and all(m.weight.grad is not None for m in norms)


def test_virtual_batch_norm_counts_two_parameters_per_channel():
    spec = genspec.load("specs/dcgan.yaml")
    nets = genspec.build(spec)
    for name, net in spec.networks.items():
        assert sum(p.numel() for p in nets[name].parameters()) == net.info.trainable


def test_wgan_gp_vanilla_alternates_and_its_ratio_variants_follow_table_2():
    # Table 2: ratio is generator updates per critic update; the vanilla row is 1:1 at 1e-3
    schedules = {"specs/wgan_gp.yaml": ([1, 1], 1e-3, 1e-3), "specs/wgan_gp/lr_1e-4.yaml": ([1, 1], 1e-4, 1e-4),
                 "specs/wgan_gp/ratio_5_1.yaml": ([1, 5], 1e-4, 1e-4),
                 "specs/wgan_gp/ratio_1_5.yaml": ([5, 1], 1e-4, 1e-4),
                 "specs/wgan_gp/ttur.yaml": ([5, 1], 4e-4, 1e-4)}
    for path, (repeats, lr_d, lr_g) in schedules.items():
        spec = genspec.load(path)
        assert [p.update for p in spec.phases] == [["dis"], ["gen"]], path
        assert [p.repeat for p in spec.phases] == repeats, path
        assert (spec.params["lr_d"], spec.params["lr_g"]) == (lr_d, lr_g), path


def test_wgan_gp_critic_is_updated_five_times_per_generator_update():
    spec = genspec.load("specs/wgan_gp/ratio_1_5.yaml")
    assert [(p.update, p.repeat) for p in spec.phases] == [(["dis"], 5), (["gen"], 1)]
    model = Model(spec, torch.device("cpu"))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    losses = model.step(model.phases[0], x)
    assert set(losses) >= {"d_loss"} and torch.isfinite(losses["d_loss"])
    env = model.compute(Env(x), [(n, model.node_fns[n]) for n in ("tensor:x_fake", "tensor:d_real", "tensor:d_fake")])
    assert env["tensor:d_real"].shape == (4, 1)


def test_dcgan_variants_differ_only_in_their_schedule_or_learning_rates():
    from genspec.report.diff import diff_specs

    base = genspec.load("specs/dcgan.yaml")
    for variant, paths in {"specs/dcgan/ttur.yaml": {("params", "lr_d"), ("params", "lr_g"),
                                                     ("objectives", "dis", "optimizer"), ("objectives", "gen", "optimizer")},
                           "specs/dcgan/ratio_1_5.yaml": None}.items():
        result = diff_specs(base, genspec.load(variant))
        assert not result["networks"]
        if paths:
            assert {tuple(c["path"]) for c in result["changes"]} == paths
        else:
            assert ("phases",) in {tuple(c["path"][:1]) for c in result["changes"]}




def test_is_splits_table_from_a_finished_run(tmp_path, capsys):
    from genspec.cli import main

    (tmp_path / "clf.yaml").write_text(TINY_DIGITS_CLASSIFIER)
    assert main(["run", str(tmp_path / "clf.yaml"), "--out", str(tmp_path / "clf"), "--no-progress"]) == 0
    assert main(["run", "specs/quickstart.yaml", "--out", str(tmp_path / "vae"), "--no-progress",
                 "--set", "train.epochs=1", "--set", "evaluate.is.samples=60", "--set", "evaluate.is.splits=2",
                 "--set", f"evaluate.extractor.classifier={tmp_path / 'clf'}"]) == 0
    capsys.readouterr()
    assert main(["is-splits", str(tmp_path / "vae"), "--splits", "1", "2", "5", "--samples", "60"]) == 0
    table = (tmp_path / "vae" / "is_splits.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "5"]
    one_split = rows[0].split("|")
    assert 1 <= float(one_split[2]) <= 10 and float(one_split[3]) == 0.0  # one split: no spread
    assert main(["is-splits", str(tmp_path / "vae"), "--splits", "100", "--samples", "60"]) == 1


def test_virtual_batch_norm_keeps_float32_statistics_under_bfloat16():
    """Under bf16 autocast (CUDA's default) a VBN row sees bfloat16 features: its E[h^2] - E[h]^2
    in bfloat16 cancels to a few bits (a variance of 0.12 became 0.0625); computed in float32 the
    output is float32's up to the output's own bfloat16 rounding."""
    torch.manual_seed(0)
    norm = VirtualBatchNorm(8, spatial=False)
    h = 3 + 0.35 * torch.randn(64, 8)  # features far from zero: the cancellation bites
    norm.reference_size = 32
    expected = norm(h)
    out = norm(h.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05
    spatial = VirtualBatchNorm(4, spatial=True)
    spatial.reference_size = 8
    h = 3 + 0.35 * torch.randn(16, 4, 5, 5)
    assert (spatial(h.bfloat16()).float() - spatial(h)).abs().max() < 0.05
