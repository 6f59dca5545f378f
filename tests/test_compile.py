"""Compile stage: layer tables -> nn.Modules (parity with shape inference, `show --json` and a
hand-written torch model), initialisation, frozen rows, and gradient routing in Model.step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import genspec
from genspec import cli
from genspec.compiler.model import Env, Model
from genspec.data.datasets import batches, load_data
from genspec.compiler.layers import LOGITS, Gaussian, TableNet
from spec_helpers import tiny_gan_doc

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers

def one_net_spec(name: str, input_shape: list, layers: list, **net_extra) -> dict:
    """A valid spec whose single network `net` reads a latent of `input_shape` and is trained
    on the mean of its output (a draw, for a gaussian head)."""
    net = {"input": "w", "layers": layers, **net_extra}
    dist = any(isinstance(r, str) and r.split()[0] == "gaussian" for r in layers[-1:])
    graph = {"out": "net(sample(w))"}
    if dist:
        graph = {"q": "net(sample(w))", "out": "rsample(q)"}
    return {
        "genspec": 1, "name": name,
        "data": {"dataset": "digits"},
        "latent": {"w": {"shape": list(input_shape)}},
        "networks": {"net": net},
        "graph": graph,
        "losses": {"l": "mean(out)"},
        "objectives": {"net": {"minimize": "l", "optimizer": "adam(1e-3)"}},
    }


def write_spec(tmp_path: Path, doc: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def show_json(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["show", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    """Load src's state (parameters and buffers) into dst, entry by entry in order."""
    s, d = src.state_dict(), dst.state_dict()
    assert len(s) == len(d), (list(s), list(d))
    new = {}
    for (ks, vs), (kd, vd) in zip(s.items(), d.items()):
        assert vs.shape == vd.shape, f"{ks} {tuple(vs.shape)} vs {kd} {tuple(vd.shape)}"
        new[kd] = vs.clone()
    dst.load_state_dict(new)


def digits_batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spec = genspec.load(QUICKSTART)
    x = load_data(spec.data, 0).train.x
    return x[torch.randperm(len(x), generator=g)[:n]]


# ---------------------------------------------------------------- parity cases
# Each case: (layers, input shape, extra network keys, hand-written torch model, taps {name: index of
# the hand-written module whose output is the tap}, gaussian head: None | ("free", n) | ("var", shape, var)).

def _encoder_conv():
    layers = ["conv 8 5x5 /2, bn, lrelu 0.2", "conv 16 3x3, relu  as feats", "maxpool 2", "dropout 0.3", "flatten",
              "fc 32, bn, relu, dropout 0.1", "fc 1, sigmoid"]
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 5, 2, 2), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(),
        nn.MaxPool2d(2, 2), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, 1), nn.Sigmoid())
    return layers, [3, 16, 16], {"init": "normal(0, 0.02)"}, ref, {"feats": 4}, None


def _decoder_deconv():
    layers = ["fc 4x4x64, relu", "deconv 32 5x5 x2, bn, relu", "deconv 16 4x4 x2, relu  as mid", "upsample 2",
              "crop 2", "conv 3 3x3 valid", "bn", "lrelu 0.1", "tanh"]
    ref = nn.Sequential(
        nn.Linear(16, 4 * 4 * 64), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),
        nn.ConvTranspose2d(64, 32, 5, 2, padding=2, output_padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ZeroPad2d(-2),  # negative padding crops 2 pixels from every border
        nn.Conv2d(16, 3, 3, 1, 0), nn.BatchNorm2d(3), nn.LeakyReLU(0.1), nn.Tanh())
    return layers, [16], {"init": "xavier_uniform"}, ref, {"mid": 7}, None


def _fc_8x8x256():
    layers = ["fc 8x8x256, relu", "conv 1 3x3, sigmoid"]
    ref = nn.Sequential(nn.Linear(8, 8 * 8 * 256), nn.ReLU(), nn.Unflatten(1, (256, 8, 8)),
                        nn.Conv2d(256, 1, 3, 1, 1), nn.Sigmoid())
    return layers, [8], {}, ref, {}, None


def _gaussian_encoder_all_but_last():
    layers = ["flatten", "fc 32, relu  as h", "fc 16, relu", "gaussian 4"]
    ref = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    return layers, [1, 8, 8], {"freeze": "all_but_last"}, ref, {"h": 2}, ("free", 4)


def _gaussian_fixed_var():
    layers = ["flatten", "fc 24, elu", "gaussian 2x2x3 var=0.5"]
    ref = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ELU(), nn.Linear(24, 12))
    return layers, [1, 8, 8], {"init": "normal(0, 0.02)"}, ref, {}, ("var", (3, 2, 2), 0.5)


def _frozen_rows():
    layers = ["conv 4 3x3, frozen", "conv 4 3x3 /2, relu", "avgpool 2", "flatten", "fc 10, ln, frozen", "fc 5"]
    ref = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(), nn.AvgPool2d(2, 2), nn.Flatten(),
                        nn.Linear(16, 10), nn.LayerNorm(10), nn.Linear(10, 5))
    return layers, [1, 8, 8], {}, ref, {}, None


CASES = {
    "conv-stride-bn-lrelu-maxpool-dropout-tap-normal": _encoder_conv,
    "fc-reshape-deconv-x2-upsample-crop-bn-xavier": _decoder_deconv,
    "fc-8x8x256": _fc_8x8x256,
    "gaussian-free-var-all_but_last": _gaussian_encoder_all_but_last,
    "gaussian-fixed-var": _gaussian_fixed_var,
    "per-row-frozen-ln-avgpool": _frozen_rows,
}

# frozen parameter counts each case must report (so the counts themselves are checked, not only their agreement)
EXPECTED_FROZEN = {
    "gaussian-free-var-all_but_last": (64 * 32 + 32) + (32 * 16 + 16),
    "per-row-frozen-ln-avgpool": (4 * 9 + 4) + (16 * 10 + 10 + 20),
}


def _parity_spec(tmp_path, case):
    layers, input_shape, extra, ref, taps, head = CASES[case]()
    path = write_spec(tmp_path, one_net_spec(case, input_shape, layers, **extra))
    return path, genspec.load(path), ref, taps, head


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_counts_equal_show_json_and_info(tmp_path, case, capsys):
    path, spec, ref, _, _ = _parity_spec(tmp_path, case)
    shown = show_json(path, capsys)["networks"]["net"]
    info = spec.networks["net"].info
    module = genspec.build(spec)["net"]
    assert counts(module) == (shown["trainable"], shown["frozen"]) == (info.trainable, info.frozen)
    assert info.frozen == EXPECTED_FROZEN.get(case, 0)
    # row by row: the module of each row holds exactly the parameters the table reports
    assert len(module.rows) == len(shown["rows"])
    for row_module, row in zip(module.rows, shown["rows"]):
        assert counts(row_module) == (row["trainable"], row["frozen"]), row["row"]
    # an independent hand-written torch model of the same table has the same size
    assert sum(p.numel() for p in ref.parameters()) == info.trainable + info.frozen


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_shapes_equal_inferred(tmp_path, case):
    _, spec, _, _, head = _parity_spec(tmp_path, case)
    net = spec.networks["net"]
    module = genspec.build(spec)["net"].eval()
    x = torch.randn(3, *net.input)
    with torch.no_grad():
        h = x
        for row_module, row in zip(module.rows, net.info.rows):
            h = row_module(h)
            got = h.mean.shape[1:] if isinstance(h, Gaussian) else h.shape[1:]
            assert tuple(got) == tuple(row.out_shape), f"row {row.index}: {row.row}"
        out = module(x)
    if head is None:
        assert tuple(out.shape) == (3, *net.info.output)
    else:
        assert isinstance(out, Gaussian)
        assert tuple(out.mean.shape) == tuple(out.logvar.shape) == (3, *net.info.output)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_hand_written_torch(tmp_path, case):
    _, spec, ref, taps, head = _parity_spec(tmp_path, case)
    net = spec.networks["net"]
    module = genspec.build(spec)["net"]
    # training moves batch-norm statistics away from their defaults, so buffers are compared too
    module.train()
    with torch.no_grad():
        module(torch.randn(8, *net.input))
    copy_by_position(module, ref)
    module.eval()
    ref.eval()
    x = torch.randn(5, *net.input, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = module.forward_taps(x)
        want = ref(x)
        if head is None:
            torch.testing.assert_close(got[None], want, rtol=1e-5, atol=1e-6)
        elif head[0] == "free":
            n = head[1]
            torch.testing.assert_close(got[None].mean, want[:, :n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[None].logvar, want[:, n:], rtol=1e-5, atol=1e-6)
        else:
            _, shape, var = head
            torch.testing.assert_close(got[None].mean, want.reshape(-1, *shape), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[None].logvar, torch.full((5, *shape), math.log(var)))
        for tap, index in taps.items():
            torch.testing.assert_close(got[tap], ref[: index + 1](x), rtol=1e-5, atol=1e-6)
        # and the logits of a network that ends in a sigmoid, which bce reads instead of its output
        assert set(got) == {None, *taps} | ({LOGITS} if net.info.ends_in_sigmoid else set())


def test_quickstart_parity(capsys):
    spec = genspec.load(QUICKSTART)
    shown = show_json(QUICKSTART, capsys)["networks"]
    nets = genspec.build(spec)
    assert set(nets) == {"enc", "dec"}
    refs = {
        "enc": nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)),
        "dec": nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid(),
                             nn.Unflatten(1, (1, 8, 8))),
    }
    # hand-computed sizes of the quickstart tables
    assert shown["enc"]["trainable"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16
    assert shown["dec"]["trainable"] == 8 * 64 + 64 + 64 * 128 + 128 + 128 * 64 + 64
    torch.manual_seed(0)
    for name, module in nets.items():
        info = spec.networks[name].info
        assert counts(module) == (shown[name]["trainable"], shown[name]["frozen"]) == (info.trainable, info.frozen)
        assert sum(p.numel() for p in refs[name].parameters()) == info.trainable
        copy_by_position(module, refs[name])
        module.eval()
        x = torch.rand(4, *spec.networks[name].input)
        with torch.no_grad():
            out, want = module(x), refs[name](x)
        if name == "enc":
            assert tuple(out.mean.shape) == (4, 8)
            torch.testing.assert_close(out.mean, want[:, :8])
            torch.testing.assert_close(out.logvar, want[:, 8:])
        else:
            assert tuple(out.shape) == (4, *info.output) == (4, 1, 8, 8)
            torch.testing.assert_close(out, want)


def test_fc_reshape_with_bn_parity(tmp_path, capsys):
    doc = one_net_spec("fcbn", [8], ["fc 8x8x256, bn, relu", "conv 1 3x3, sigmoid"])
    path = write_spec(tmp_path, doc)
    spec = genspec.load(path)
    shown = show_json(path, capsys)["networks"]["net"]
    module = genspec.build(spec)["net"]
    ref = nn.Sequential(nn.Linear(8, 16384), nn.Unflatten(1, (256, 8, 8)), nn.BatchNorm2d(256), nn.ReLU(),
                        nn.Conv2d(256, 1, 3, 1, 1), nn.Sigmoid())
    assert shown["trainable"] == sum(p.numel() for p in ref.parameters())
    assert counts(module) == (shown["trainable"], shown["frozen"])
    # and it computes the same function: the norm acts per channel after the reshape
    copy_by_position(module, ref)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for mode in (True, False):  # batch statistics, then the running ones updated by the first call
        module.train(mode)
        ref.train(mode)
        torch.testing.assert_close(module(x), ref(x))


# ---------------------------------------------------------------- initialisation

def _weighted(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def test_init_normal_std_and_zero_bias(tmp_path):
    layers = ["conv 64 5x5 /2, relu", "deconv 32 4x4 x2, relu", "flatten", "fc 128, relu", "gaussian 16"]
    spec = genspec.load(write_spec(tmp_path, one_net_spec("initn", [3, 16, 16], layers, init="normal(0, 0.02)")))
    torch.manual_seed(0)
    module = genspec.build(spec)["net"]
    weighted = _weighted(module)
    assert len(weighted) == 4
    for m in weighted:
        w = m.weight.detach()
        assert abs(w.std().item() - 0.02) < 0.002, (m, w.std().item())
        assert abs(w.mean().item()) < 0.002
        assert m.bias is not None and torch.count_nonzero(m.bias) == 0


def test_init_normal_mean_argument(tmp_path):
    spec = genspec.load(write_spec(tmp_path, one_net_spec("initm", [64], ["fc 256"], init="normal(0.5, 0.1)")))
    w = genspec.build(spec)["net"].rows[0].linear.weight.detach()
    assert abs(w.mean().item() - 0.5) < 0.01 and abs(w.std().item() - 0.1) < 0.01


def test_init_xavier_uniform_bounds_and_zero_bias(tmp_path):
    layers = ["conv 32 5x5 /2, bn, relu", "deconv 16 5x5 x2, relu", "flatten", "fc 64", "fc 64"]
    spec = genspec.load(write_spec(tmp_path, one_net_spec("initx", [3, 16, 16], layers, init="xavier_uniform")))
    torch.manual_seed(0)
    module = genspec.build(spec)["net"]
    weighted = _weighted(module)
    assert len(weighted) == 4
    for m in weighted:
        w = m.weight.detach()
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound
        # uniform(-b, b) has std b/sqrt(3); PyTorch's default init would be about sqrt(3) times narrower here
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), m
        assert torch.count_nonzero(m.bias) == 0
    bn = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 1 and torch.all(bn[0].weight == 1) and torch.all(bn[0].bias == 0)


def test_default_init_keeps_torch_defaults(tmp_path):
    spec = genspec.load(write_spec(tmp_path, one_net_spec("initd", [64], ["fc 256"])))
    lin = genspec.build(spec)["net"].rows[0].linear
    assert torch.count_nonzero(lin.bias) > 0  # torch's default init draws biases


# ---------------------------------------------------------------- routing

GAN = tiny_gan_doc("tinygan", 0.01, [{"update": ["dis"]}, {"update": ["gen"]}, {"update": ["dis", "gen"]}])

VAEGAN = {
    "genspec": 1, "name": "tinyvaegan",
    "params": {"gamma": 0.5},
    "data": {"dataset": "digits", "split": {"train": 160, "test": 32}},
    "latent": {"z": {"shape": [4]}},
    "networks": {
        "enc": {"input": "x", "layers": ["flatten", "fc 32, relu", "gaussian 4"]},
        "dec": {"input": "z", "layers": ["fc 64, sigmoid", "reshape 1 8 8"]},
        "dis": {"input": "x", "layers": ["conv 4 3x3, lrelu 0.2  as feat", "flatten", "fc 1, sigmoid"]},
    },
    "graph": {"q": "enc(x)", "z": "rsample(q)", "x_rec": "dec(z)", "x_p": "dec(sample(z))"},
    "losses": {
        "kl": "kl(q, z)",
        "llike": "sqerr(dis.feat(x_rec), dis.feat(x))",
        "gan": "bce(dis(x), 1) + bce(dis(x_rec.detach()), 0) + bce(dis(x_p.detach()), 0)",
        "adv": "bce(dis(x_rec), 1) + bce(dis(x_p), 1)",
    },
    "objectives": {
        "enc": {"minimize": "kl + llike", "optimizer": "adam(1e-2)"},
        "dec": {"minimize": "gamma * llike + adv", "optimizer": "adam(1e-2)"},
        "dis": {"minimize": "gan", "optimizer": "adam(1e-2)"},
    },
    "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu",
              "phases": [{"update": ["enc", "dec", "dis"]}, {"update": ["dec"]}, {"update": ["dis"]}]},
}


def snapshot(model: Model) -> dict:
    return {name: {k: v.detach().clone() for k, v in net.state_dict().items()} for name, net in model.networks.items()}


def changed(before: dict, model: Model) -> set:
    out = set()
    for name, net in model.networks.items():
        if any(not torch.equal(before[name][k], v) for k, v in net.state_dict().items()):
            out.add(name)
    return out


def make_model(tmp_path, doc, seed=0):
    spec = genspec.load(write_spec(tmp_path, doc))
    torch.manual_seed(seed)
    return spec, Model(spec, CPU)


@pytest.mark.parametrize("phase, moved", [(0, {"dis"}), (1, {"gen"}), (2, {"dis", "gen"})])
def test_gan_step_moves_only_the_phase_networks(tmp_path, phase, moved):
    spec, model = make_model(tmp_path, GAN)
    x = digits_batch() * 2 - 1
    before = snapshot(model)
    losses = model.step(model.phases[phase], x)
    assert changed(before, model) == moved
    for name in {"gen", "dis"} - moved:
        assert all(p.grad is None for p in model.networks[name].parameters()), name
    expected = {"dis": {"d_real", "d_fake", "objective/dis"}, "gen": {"g_adv", "objective/gen"}}
    assert set(losses) == set().union(*(expected[n] for n in moved))


def _grads_of_each_objective_alone(spec, phase_index, x, doc_seed=0, step_seed=1):
    """Gradients each objective of a phase gives its own networks, computed one objective at a time
    on a twin model with the same weights and the same random draws."""
    torch.manual_seed(doc_seed)
    twin = Model(spec, CPU)
    phase = twin.phases[phase_index]
    torch.manual_seed(step_seed)
    env = twin.compute(Env(x), phase.nodes)
    out = {}
    for name in phase.objectives:
        run = twin.objectives[name]
        loss = run.loss(env)
        out[name] = torch.autograd.grad(loss, run.params, retain_graph=True)
    return out


@pytest.mark.parametrize("doc, phase", [(GAN, 2), (VAEGAN, 0)], ids=["gan-joint", "vaegan-joint"])
def test_each_network_gets_only_its_own_objectives_gradient(tmp_path, doc, phase):
    spec, model = make_model(tmp_path, doc)
    x = digits_batch()
    if doc is GAN:
        x = x * 2 - 1
    want = _grads_of_each_objective_alone(spec, phase, x)
    torch.manual_seed(1)
    model.step(model.phases[phase], x)
    for name, grads in want.items():
        params = model.objectives[name].params
        assert len(params) == len(grads) > 0
        for p, g in zip(params, grads):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=f"objective {name}")


def test_vaegan_generator_objective_leaves_discriminator_untouched(tmp_path):
    # dec's loss reads dis.feat(x_rec) and dis(x_rec): gradients flow *through* dis, never *into* it
    spec, model = make_model(tmp_path, VAEGAN)
    x = digits_batch()
    before = snapshot(model)
    losses = model.step(model.phases[1], x)
    assert changed(before, model) == {"dec"}
    assert all(p.grad is None for p in model.networks["dis"].parameters())
    assert all(p.grad is None for p in model.networks["enc"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.networks["dec"].parameters())
    assert {"llike", "adv", "objective/dec"} <= set(losses) and "gan" not in losses
    # and a discriminator-only phase leaves the encoder and decoder alone
    before = snapshot(model)
    model.step(model.phases[2], x)
    assert changed(before, model) == {"dis"}


def test_step_losses_are_detached_and_finite(tmp_path):
    spec, model = make_model(tmp_path, VAEGAN)
    losses = model.step(model.phases[0], digits_batch())
    assert {"kl", "llike", "gan", "adv", "objective/enc", "objective/dec", "objective/dis"} <= set(losses)
    for v in losses.values():
        assert not v.requires_grad and torch.isfinite(v)


# ---------------------------------------------------------------- frozen rows

FROZEN_VAE = {
    "genspec": 1, "name": "frozenvae",
    "data": {"dataset": "digits", "split": {"train": 160, "test": 32}},
    "latent": {"z": {"shape": [4]}},
    "networks": {
        "enc": {"input": "x", "freeze": "all_but_last",
                "layers": ["conv 4 3x3, bn, relu", "flatten", "fc 32, relu", "gaussian 4"]},
        "dec": {"input": "z", "layers": ["fc 32, relu, frozen", "fc 16 bias=false, bn", "relu", "fc 64, sigmoid", "reshape 1 8 8"]},
    },
    "graph": {"q": "enc(x)", "z": "rsample(q)", "x_rec": "dec(z)"},
    "losses": {"rec": "sqerr(x_rec, x)", "kl": "kl(q, z)"},
    "objectives": {"vae": {"networks": ["enc", "dec"], "minimize": "rec + kl", "optimizer": "adam(1e-2)"}},
    "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu"},
}


def test_frozen_rows_do_not_move_while_others_do(tmp_path):
    spec, model = make_model(tmp_path, FROZEN_VAE)
    frozen_rows = {"enc": [0, 2], "dec": [0]}
    for name, rows in frozen_rows.items():
        info = spec.networks[name].info
        assert [r.index for r in info.rows if r.frozen] == rows
    before = {n: {k: p.detach().clone() for k, p in net.named_parameters()} for n, net in model.networks.items()}
    optimised = {id(p) for group in model.objectives["vae"].optimizer.param_groups for p in group["params"]}
    splits = load_data(spec.data, 0)
    steps = 0
    for x, y in batches(splits.train, 16, torch.Generator().manual_seed(0)):
        model.step(model.phases[0], x, y)
        steps += 1
    assert steps == 10
    for name, net in model.networks.items():
        for key, p in net.named_parameters():
            row = int(key.split(".")[1])
            if row in frozen_rows[name]:
                assert not p.requires_grad and id(p) not in optimised, key
                assert torch.equal(p, before[name][key]), f"frozen {name}.{key} moved"
            else:
                assert p.requires_grad and id(p) in optimised, key
                assert not torch.equal(p, before[name][key]), f"trainable {name}.{key} did not move"


def test_batch_norm_of_a_frozen_row_keeps_its_running_statistics(tmp_path):
    # a frozen row is a fixed function: its batch norm stays in eval mode while the rest trains
    spec, model = make_model(tmp_path, FROZEN_VAE)
    enc, dec = model.networks["enc"], model.networks["dec"]
    enc.train()
    dec.train()
    frozen_bn = [m for m in enc.rows[0].modules() if isinstance(m, nn.BatchNorm2d)]
    trained_bn = [m for m in dec.rows[1].modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(frozen_bn) == len(trained_bn) == 1
    assert not frozen_bn[0].training and trained_bn[0].training
    before = {k: v.clone() for k, v in frozen_bn[0].state_dict().items()}
    before_trained = trained_bn[0].running_mean.clone()
    model.step(model.phases[0], digits_batch())
    for key, value in frozen_bn[0].state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(trained_bn[0].running_mean, before_trained)


def test_entirely_frozen_network_is_not_trained_by_default_phase(tmp_path):
    doc = yaml.safe_load(yaml.safe_dump(FROZEN_VAE))
    doc["networks"]["aux"] = {"input": "x", "freeze": True, "layers": ["flatten", "fc 3"]}
    doc["graph"]["feats"] = "aux(x)"
    doc["losses"]["aux_l"] = "mean(feats)"
    doc["objectives"]["vae"]["minimize"] = "rec + kl + aux_l"  # aux runs in the step, but nothing of it trains
    spec, model = make_model(tmp_path, doc)
    assert "tensor:feats" in [n for n, _ in model.phases[0].nodes]
    assert spec.networks["aux"].info.trainable == 0
    before = snapshot(model)
    model.step(model.phases[0], digits_batch())
    assert "aux" not in changed(before, model)
    assert all(not p.requires_grad for p in model.networks["aux"].parameters())
    assert isinstance(genspec.build(spec)["aux"], TableNet)


def test_same_padding_keeps_size_for_even_kernels(tmp_path):
    spec = genspec.load(write_spec(tmp_path, one_net_spec("evenk", [1, 8, 8], ["conv 8 4x4", "conv 8 2x2"])))
    for row in spec.networks["net"].info.rows:
        assert row.out_shape == (8, 8, 8), f"{row.row} -> {row.out_shape}"
    module = genspec.build(spec)["net"]
    assert tuple(module(torch.rand(2, 1, 8, 8)).shape) == (2, 8, 8, 8)
    # TensorFlow's 'same': a 4x4 kernel pads 1 left/top and 2 right/bottom, a 2x2 kernel 0 and 1
    ref = nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(1, 8, 4), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 2))
    copy_by_position(module, ref)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x))


def test_same_padding_with_an_even_kernel_at_stride_2_matches_shape_inference(tmp_path):
    spec = genspec.load(write_spec(tmp_path, one_net_spec("evenk2", [1, 7, 7], ["conv 8 4x4 /2", "conv 4 4x4 /2"])))
    module = genspec.build(spec)["net"]
    x = torch.rand(2, 1, 7, 7)
    for row, layer in zip(spec.networks["net"].info.rows, module.rows):
        x = layer(x)
        assert tuple(x.shape[1:]) == row.out_shape
    assert spec.networks["net"].info.output == (4, 2, 2)
