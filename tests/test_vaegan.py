"""The VAE-GAN family of "Improved disentangling in VAE-GANs" (specs/larsen_vaegan.yaml and the
variants beta_vaegan, celeba_vae, celeba_gan), checked against the paper and against plain torch.

- Table 1's three networks, written by hand as torch modules, have the parameter counts that
  `genspec show --json` reports, and (weights copied by position) compute what genspec builds.
- The feature-wise likelihood never moves the discriminator: Model.step routes each objective's
  gradient into its own networks only, and the discriminator's update is exactly a plain Adam
  step on the gradient of `gan` alone (a twin model, identical weights and RNG state).
- Soft labels 0.95 / 0.05 swapped with probability 0.05, drawn anew at every use.
- `key: null` removes inherited sections (the VAE and GAN baselines).
- Tiny runs of all four specs on a generated image folder, one with an FID through a tiny
  registered classifier; CelebA missing, and CelebA's loader with torchvision's class faked.
- `genspec diff` between the variants, and a two-trial tune of beta.

CelebA is never present and nothing is downloaded. The networks are big (the encoder alone has
35M parameters), so every run is a handful of 64x64 images on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import genspec
from genspec import cli
from genspec.compiler import ops as gops
from genspec.compiler.model import Env, Model
from genspec.data.datasets import load_data
from genspec.compiler.ops import SoftLabel, bce, bce_from_logits
from genspec.lang.resolve import resolve
from spec_helpers import genspec_subprocess

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
LARSEN = SPECS / "larsen_vaegan.yaml"
BETA = SPECS / "beta_vaegan.yaml"
CELEBA_VAE = SPECS / "celeba_vae.yaml"
CELEBA_GAN = SPECS / "celeba_gan.yaml"
CPU = torch.device("cpu")

# linear_operator warns on import; Ax uses pandas keywords that pandas has deprecated
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::Warning:ax")]


# ---------------------------------------------------------------- helpers

def genspec_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return genspec_subprocess(*args, timeout=timeout)


def genspec_main(*args) -> tuple[int, str, str]:
    """The same command through `genspec.cli.main` in this process (spares torch's import)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


def image_overrides(folder: Path) -> list[str]:
    """The brief's tiny-run overrides: the image folder instead of CelebA, 16 / 8 images, one epoch."""
    sets = ["data.dataset=image_folder", f"data.root={folder}", "data.split.train=16", "data.split.test=8",
            "train.epochs=1", "train.batch_size=4"]
    return [a for s in sets for a in ("--set", s)]


def a_batch(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def larsen():
    return genspec.load(LARSEN, ["train.device=cpu"])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 random RGB PNGs of 70x80 pixels (width x height), 12 in each of two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("cls_a" if i % 2 else "cls_b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (80, 70, 3), dtype=np.uint8), "RGB").save(folder / f"img_{i:02d}.png")
    return root


# ---------------------------------------------------------------- 1. Table 1 by hand

def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.BatchNorm2d(c_out), nn.ReLU()]


def _deconv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class HandEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(3, 64), *_conv_bn_relu(64, 128), *_conv_bn_relu(128, 256), nn.Flatten(),
                                  nn.Linear(256 * 8 * 8, 2048), nn.BatchNorm1d(2048), nn.ReLU(),
                                  nn.Linear(2048, 2 * 128))  # mean and log-variance of z

    def forward(self, x):
        return self.body(x)


class HandDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(128, 8 * 8 * 256)
        self.bn = nn.BatchNorm2d(256)
        self.body = nn.Sequential(nn.ReLU(), *_deconv_bn_relu(256, 256), *_deconv_bn_relu(256, 128),
                                  *_deconv_bn_relu(128, 32), nn.Conv2d(32, 3, 5, padding=2), nn.Tanh())

    def forward(self, z):
        return self.body(self.bn(self.fc(z).view(-1, 256, 8, 8)))


class HandDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), *_conv_bn_relu(32, 128),
                                  *_conv_bn_relu(128, 256), *_conv_bn_relu(256, 256))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256 * 8 * 8, 1), nn.Sigmoid())

    def forward(self, x):
        features = self.body(x)  # Dis_l, the tap `features`
        return self.head(features), features


HAND = {"enc": HandEncoder, "dec": HandDecoder, "dis": HandDiscriminator}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    """Every parameter and buffer of src into dst, in registration order (shapes must agree)."""
    s, d = list(src.state_dict().items()), list(dst.state_dict().items())
    assert len(s) == len(d), f"{len(s)} tensors in genspec's module, {len(d)} in the hand-written one"
    with torch.no_grad():
        for (ks, vs), (kd, vd) in zip(s, d):
            assert vs.shape == vd.shape, f"{ks} {tuple(vs.shape)} vs {kd} {tuple(vd.shape)}"
            vd.copy_(vs)


def _scramble_batch_norms(module: nn.Module, seed: int) -> None:
    """Give every batch norm non-trivial weights and running statistics, so that eval-mode outputs are
    of a useful size (the spec's normal(0, 0.02) batch-norm weights shrink them towards 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
                m.running_mean.copy_(0.02 * torch.rand(n, generator=g) - 0.01)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 1e-3, f"outputs too small ({scale:g}) to tell networks apart"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_show_json_counts_match_table1_written_by_hand():
    result = genspec_cli("show", "--json", LARSEN)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)["networks"]
    assert set(shown) == {"enc", "dec", "dis"}
    for name, cls in HAND.items():
        expected = _count(cls())
        assert shown[name]["trainable"] == expected, name
        assert shown[name]["frozen"] == 0
        assert sum(row["params"] for row in shown[name]["rows"]) == expected, name
    # the counts themselves, so that a change to both sides at once cannot pass unseen
    assert {n: shown[n]["trainable"] for n in shown} == {"enc": 35_115_264, "dec": 4_677_699, "dis": 2_580_737}
    assert shown["enc"]["output"] == [128] and shown["dec"]["output"] == [3, 64, 64] and shown["dis"]["output"] == [1]


def test_built_networks_compute_what_table1_written_by_hand_computes(larsen):
    torch.manual_seed(0)
    nets = genspec.build(larsen)
    assert set(nets) == {"enc", "dec", "dis"}
    # Table 3's initialisation: N(0, 0.02^2) for conv / batch-norm / fc weights, biases 0
    fc = nets["enc"].rows[3].linear
    assert abs(fc.weight.std().item() - 0.02) < 5e-4 and abs(fc.weight.mean().item()) < 5e-4
    assert torch.count_nonzero(fc.bias) == 0
    bn = nets["enc"].rows[3].post[0]
    assert isinstance(bn, nn.BatchNorm1d) and abs(bn.weight.std().item() - 0.02) < 3e-3

    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(3, 128, generator=g)
    for name, net in nets.items():
        _scramble_batch_norms(net, seed=len(name))
        hand = HAND[name]()
        assert _count(hand) == _count(net), name
        _copy_by_position(net, hand)
        net.eval()
        hand.eval()
        with torch.no_grad():
            if name == "enc":
                q = net(x)
                assert q.mean.shape == (3, 128) and q.logvar.shape == (3, 128)
                _assert_same(torch.cat([q.mean, q.logvar], dim=1), hand(x))
            elif name == "dec":
                out = net(z)
                assert out.shape == (3, 3, 64, 64)
                _assert_same(out, hand(z))
            else:
                taps = net.forward_taps(x)
                p, features = hand(x)
                assert taps[None].shape == (3, 1) and taps["features"].shape == (3, 256, 8, 8)
                assert ((taps[None] > 0) & (taps[None] < 1)).all()
                _assert_same(taps["features"], features)
                torch.testing.assert_close(taps[None], p, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- 2. the feature loss and the discriminator

def test_encoder_decoder_phase_leaves_discriminator_bit_identical():
    spec = genspec.load(LARSEN, ["train.device=cpu", "train.phases=[{update: [enc, dec]}, {update: [dis]}]"])
    torch.manual_seed(0)
    model = Model(spec, CPU)
    model.train(True)
    before = {k: v.clone() for k, v in model.networks.state_dict().items()}
    torch.manual_seed(7)
    losses = model.step(model.phases[0], a_batch())
    assert "gan" in losses and "llike" in losses and "objective/dis" not in losses
    after = model.networks.state_dict()
    for name, p in model.networks["dis"].named_parameters():
        assert torch.equal(p, before[f"dis.{name}"]), f"dis.{name} moved"
        assert p.grad is None, f"dis.{name} received a gradient"
    # the discriminator did run in this step (its batch-norm statistics moved) ...
    assert not torch.equal(after["dis.rows.1.1.running_mean"], before["dis.rows.1.1.running_mean"])
    # ... and the encoder and decoder were updated
    for net in ("enc", "dec"):
        moved = [k for k, _ in model.networks[net].named_parameters() if not torch.equal(after[f"{net}.{k}"], before[f"{net}.{k}"])]
        assert len(moved) == len(list(model.networks[net].parameters())), net


def test_discriminator_update_is_plain_adam_on_gan_alone(larsen):
    torch.manual_seed(0)
    model = Model(larsen, CPU)
    torch.manual_seed(0)
    twin = Model(larsen, CPU)
    dis, dis_twin = list(model.networks["dis"].parameters()), list(twin.networks["dis"].parameters())
    for name in ("enc", "dec", "dis"):  # the routing table: objective X owns network X's parameters, all of them
        assert [id(p) for p in model.objectives[name].params] == [id(p) for p in model.networks[name].parameters()]
    assert model.phases[0].objectives == ["enc", "dec", "dis"]
    assert all(torch.equal(a, b) for a, b in zip(model.networks.state_dict().values(), twin.networks.state_dict().values()))
    x = a_batch()

    torch.manual_seed(7)  # the soft labels and the prior draw random numbers: same seed for both
    losses = model.step(model.phases[0], x)

    torch.manual_seed(7)
    env = twin.compute(Env(x), twin.phases[0].nodes)
    assert torch.equal(env["loss:gan"].detach(), losses["gan"])
    g_gan = torch.autograd.grad(env["loss:gan"], dis_twin, retain_graph=True)
    enc_obj = twin.objectives["enc"].loss(env)
    dec_obj = twin.objectives["dec"].loss(env)
    g_others = [a if a is not None else torch.zeros_like(p) for a, p in zip(
        torch.autograd.grad(enc_obj + dec_obj, dis_twin, retain_graph=True, allow_unused=True), dis_twin)]
    # the feature-wise likelihood (in both) does depend on the discriminator's weights: the other
    # objectives do have gradients to leak into it, were the step not to route them
    assert any(g.abs().max() > 0 for g in g_others)

    # the gradient the step left on the discriminator is exactly that of `gan`
    for p, g in zip(dis, g_gan):
        assert torch.equal(p.grad, g)

    optimizer = model.objectives["dis"].optimizer
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == pytest.approx(3e-4)
    start = [p.detach().clone() for p in dis_twin]
    implementation = {"fused": optimizer.defaults["fused"]}  # Adam's fused kernel, genspec's default
    adam = torch.optim.Adam(dis_twin, lr=larsen.params["lr"], **implementation)
    for p, g in zip(dis_twin, g_gan):
        p.grad = g
    adam.step()
    for a, b in zip(dis, dis_twin):
        assert torch.equal(a, b)

    # negative control: had every objective's gradient reached the discriminator, the update differs
    leaked = [s.clone().requires_grad_(True) for s in start]
    adam_leaked = torch.optim.Adam(leaked, lr=larsen.params["lr"], **implementation)
    for p, g, o in zip(leaked, g_gan, g_others):
        p.grad = g + o
    adam_leaked.step()
    assert any(not torch.equal(a, b) for a, b in zip(dis, leaked))


# ---------------------------------------------------------------- 3. soft, swapped labels

N_DRAWS = 200_000


def _check_swap_rate(target: torch.Tensor, value: float, other: float, rate: float = 0.05) -> torch.Tensor:
    value_t, other_t = torch.tensor(value, dtype=target.dtype), torch.tensor(other, dtype=target.dtype)
    swapped = target == other_t
    assert bool((swapped | (target == value_t)).all()), "a target is neither the label nor its swap"
    n = target.numel()
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(int(swapped.sum()) - n * rate) < 4 * sigma, f"{int(swapped.sum())} swaps of {n}"
    return swapped


def test_soft_label_swap_rate_and_fresh_draws():
    label = SoftLabel(0.95, swap=0.05, other=0.05)
    torch.manual_seed(0)
    first = _check_swap_rate(label.like(torch.empty(N_DRAWS)), 0.95, 0.05)
    second = _check_swap_rate(label.like(torch.empty(N_DRAWS)), 0.95, 0.05)
    assert not torch.equal(first, second)
    # independent draws: both swapped about n * 0.05^2 times
    both, expected = int((first & second).sum()), N_DRAWS * 0.05 ** 2
    assert abs(both - expected) < 4 * math.sqrt(expected * (1 - 0.05 ** 2))
    # without swap the label is a constant and draws nothing
    state = torch.get_rng_state()
    assert torch.equal(SoftLabel(0.9).like(torch.empty(5)), torch.full((5,), 0.9))
    assert torch.equal(torch.get_rng_state(), state)
    # bce with a soft label is the binary cross-entropy against the drawn targets
    p = torch.rand(64, generator=torch.Generator().manual_seed(1)).clamp(0.01, 0.99)
    torch.manual_seed(5)
    loss = bce(p, label)
    torch.manual_seed(5)
    assert torch.equal(loss, F.binary_cross_entropy(p, label.like(p)))


def test_larsen_gan_loss_uses_swapped_soft_labels(larsen, monkeypatch):
    assert larsen.labels == {"real": {"value": 0.95, "swap": 0.05, "other": 0.05},
                             "fake": {"value": 0.05, "swap": 0.05, "other": 0.95}}
    calls = []

    def recording_bce(p, target):
        calls.append((p, target))
        return bce(p, target)

    def recording_bce_from_logits(logits, target):
        calls.append((logits, target))
        return bce_from_logits(logits, target)

    monkeypatch.setitem(gops.TENSOR_OPS, "bce", recording_bce)  # before compiling: closures capture it
    monkeypatch.setitem(gops.FROM_LOGITS, "bce", recording_bce_from_logits)  # dis ends in a sigmoid: bce reads its logits
    torch.manual_seed(0)
    model = Model(larsen, CPU)
    env = model.compute(Env(a_batch()), model.phases[0].nodes)
    assert len(calls) == 3
    by_input = {id(p): target for p, target in calls}
    real = by_input[id(env.logits[id(env["tensor:d_real"])])]
    fakes = [by_input[id(env.logits[id(env["tensor:d_rec"])])], by_input[id(env.logits[id(env["tensor:d_p"])])]]
    # the targets reach bce as labels, not as tensors drawn once: every step draws its own
    assert isinstance(real, SoftLabel) and all(isinstance(f, SoftLabel) for f in fakes)
    assert (real.value, real.swap, real.other) == (0.95, 0.05, 0.05)
    assert all((f.value, f.swap, f.other) == (0.05, 0.05, 0.95) for f in fakes)
    torch.manual_seed(0)
    a = _check_swap_rate(real.like(torch.empty(N_DRAWS)), 0.95, 0.05)
    b = _check_swap_rate(real.like(torch.empty(N_DRAWS)), 0.95, 0.05)
    assert not torch.equal(a, b)
    _check_swap_rate(fakes[0].like(torch.empty(N_DRAWS)), 0.05, 0.95)
    # a second step uses the same labels again (drawing anew inside bce)
    model.compute(Env(a_batch(seed=2)), model.phases[0].nodes)
    assert len(calls) == 6 and calls[3][1] is real


# ---------------------------------------------------------------- 4. `key: null` in the variants

def test_celeba_vae_removes_the_discriminator_and_its_losses():
    vae, base = genspec.load(CELEBA_VAE), genspec.load(LARSEN)
    assert set(vae.networks) == {"enc", "dec"}
    assert set(vae.losses) == {"prior", "llike"}
    assert set(vae.objectives) == {"vae"} and vae.objectives["vae"].networks == ["enc", "dec"]
    assert vae.labels == {} and "labels" not in vae.raw
    assert not {"d_real", "d_rec", "d_p"} & set(vae.graph)
    assert [p.update for p in vae.phases] == [["vae"]]
    # the rest is inherited: Table 1's encoder and decoder, the latent, the params, CelebA
    for name in ("enc", "dec"):
        assert vae.networks[name].rows == base.networks[name].rows
        assert vae.networks[name].info.trainable == base.networks[name].info.trainable
    assert vae.params == base.params and vae.data == base.data
    assert vae.evaluate["losses"] == ["prior", "llike"] and vae.evaluate["fid"] == {"samples": 1000}


def test_celeba_gan_removes_the_encoder():
    gan = genspec.load(CELEBA_GAN)
    assert set(gan.networks) == {"dec", "dis"}
    assert not {"q", "z", "x_rec", "d_rec"} & set(gan.graph) and {"x_p", "d_real", "d_p"} <= set(gan.graph)
    assert set(gan.losses) == {"gan", "gen"}
    assert set(gan.objectives) == {"dec", "dis"}
    # the objectives merge deeply: a new `minimize`, the inherited optimiser and network
    dec = gan.objectives["dec"]
    assert dec.networks == ["dec"] and dec.optimizer == "adam" and dec.optimizer_args == {"lr": 3e-4}
    assert set(gan.labels) == {"real", "fake"}
    assert [p.update for p in gan.phases] == [["dec", "dis"]]


def test_null_removes_only_the_inherited_key(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {keep: 1, drop: {deep: 2}}\nb: 3\nc: [1, 2]\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\na: {drop: null}\nc: null\n")
    assert resolve(tmp_path / "child.yaml").data == {"a": {"keep": 1}, "b": 3}


# ---------------------------------------------------------------- 5. tiny runs

def _check_run(out: Path, losses: set, grids: set, streamed: int = 0) -> dict:
    """A tiny run's folder and metrics; `streamed`: the DataLoader workers of a streamed run (0: held in memory)."""
    assert (out / "report.md").is_file() and (out / "samples.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == losses
    assert all(math.isfinite(v) for v in metrics["test"].values())
    assert set(metrics["grids"]) == grids
    notes = metrics["data"].pop("notes")
    assert metrics["data"] == {"dataset": "image_folder", "train": 16, "test": 8, "val": 0}
    assert notes == ([f"streamed from image files: 0.0 GiB decoded as float32; {streamed} DataLoader worker(s) decode each batch"]
                     if streamed else [])
    with Image.open(out / "samples.png") as img:
        assert img.size == (8 * 66 + 2, 8 * 66 + 2)  # an 8x8 grid of 64x64 samples, 2 pixels apart
    return metrics


RUNS = {
    "larsen_vaegan": ({"prior", "llike", "gan"}, {"samples", "reconstructions", "interpolations"}, {"enc", "dec", "dis"}),
    "beta_vaegan": ({"prior", "llike", "gan"}, {"samples", "reconstructions", "interpolations"}, {"enc", "dec", "dis"}),
    "celeba_vae": ({"prior", "llike"}, {"samples", "reconstructions", "interpolations"}, {"enc", "dec"}),
    "celeba_gan": ({"gan", "gen"}, {"samples", "interpolations"}, {"dec", "dis"}),
}


@pytest.mark.parametrize("name", [
    pytest.param("larsen_vaegan", marks=pytest.mark.slow),  # un-marked below, with an FID
    pytest.param("beta_vaegan", marks=pytest.mark.slow),  # larsen's networks again; un-marked in the tune
    "celeba_vae",
    "celeba_gan",
])
def test_tiny_run_on_an_image_folder(name, image_folder, tmp_path):
    out = tmp_path / name
    rc, stdout, stderr = genspec_main("run", SPECS / f"{name}.yaml", "--out", out, *image_overrides(image_folder),
                                      "--set", "evaluate.fid=null", "--no-progress")
    assert rc == 0, stderr
    assert f"{name}: done" in stdout
    losses, grids, nets = RUNS[name]
    metrics = _check_run(out, losses, grids)
    assert set(metrics["params"]) == nets
    assert "fidelity" not in metrics


CLASSIFIER_SPEC = """\
genspec: 1
name: tiny_image_classifier
data:
  dataset: image_folder
  root: {root}
  image_size: 16
  range: [-1, 1]
  labels: true
  split: {{train: 16, test: 8}}
networks:
  clf:
    input: x
    layers:
      - flatten
      - fc 16, relu  as features
      - fc 2, log_softmax
graph:
  logp: clf(x)
losses:
  nll: nll(logp, y)
objectives:
  clf: {{minimize: nll, optimizer: adam(1e-2)}}
train:
  epochs: 1
  batch_size: 8
  device: cpu
evaluate:
  grids: {{}}
  accuracy: logp
"""


@pytest.fixture(scope="module")
def classifier_run(image_folder, tmp_path_factory) -> Path:
    """A finished classifier run (two classes: the two image folders) to extract FID features with."""
    from genspec.experiments.run import run

    folder = tmp_path_factory.mktemp("classifier")
    path = folder / "classifier.yaml"
    path.write_text(CLASSIFIER_SPEC.format(root=image_folder))
    out = folder / "run"
    metrics = run(genspec.load(path), out=out, progress=False)
    assert "test_accuracy" in metrics and (out / "checkpoint.pt").is_file()
    return out


def test_larsen_run_with_fid_through_a_registered_classifier(image_folder, classifier_run, tmp_path):
    """Larsen's whole pipeline, streamed as full-size CelebA is by default: 2 DataLoader workers."""
    out = tmp_path / "larsen"
    result = genspec_cli("run", LARSEN, "--out", out, *image_overrides(image_folder),
                         "--set", "evaluate.fid.samples=8", "--set", "evaluate.reference.size=8",
                         "--set", f"evaluate.extractor.classifier={classifier_run}", "--no-progress",
                         "--set", "train.loader=stream", "--set", "train.workers=2")
    assert result.returncode == 0, result.stderr
    losses, grids, nets = RUNS["larsen_vaegan"]
    metrics = _check_run(out, losses, grids, streamed=2)
    assert set(metrics["params"]) == nets
    assert metrics["params"]["enc"]["trainable"] == 35_115_264
    fid = metrics["fidelity"]["frechet_inception_distance"]
    assert math.isfinite(fid) and fid >= 0
    protocol = metrics["protocol"]
    assert protocol["extractor"] == f"network clf of the classifier run {classifier_run}"
    assert protocol["reference_size"] == 8 and protocol["samples"] == {"fid": 8}
    assert protocol["feature_row"] == 1  # the tap `features`
    report = (out / "report.md").read_text()
    assert "## Sample quality" in report and f"| frechet_inception_distance | {fid:.5g} |" in report


def test_missing_celeba_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = genspec_cli("run", LARSEN, "--out", out, "--set", f"data.root={empty}", "--set", "evaluate.fid=null",
                         "--no-progress")
    assert result.returncode == 1
    assert "img_align_celeba" in result.stderr and "list_eval_partition.txt" in result.stderr
    assert str((empty / "celeba").resolve()) in result.stderr  # where the files go
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing was written


CELEBA_SPLITS = {"train": 3, "valid": 2, "test": 1}


def _celeba_image(k: int) -> Image.Image:
    """178x218 like CelebA's aligned crops: red bands of 20 rows above and below the central
    178x178 square, whose left half is (10, 20k, 100) and right half (200, 20k, 30)."""
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    arr[:, :] = (255, 0, 0)
    arr[20:198, :89] = (10, 20 * k, 100)
    arr[20:198, 89:] = (200, 20 * k, 30)
    return Image.fromarray(arr, "RGB")


def test_celeba_loader_with_torchvision_faked(tmp_path, monkeypatch):
    import torchvision

    images = tmp_path / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    names, k = {}, 0
    for split, n in CELEBA_SPLITS.items():
        names[split] = []
        for _ in range(n):
            name = f"{k + 1:06d}.png"
            _celeba_image(k).save(images / name)
            names[split].append(name)
            k += 1
    calls = []

    class FakeCelebA:
        base_folder = "celeba"

        def __init__(self, root, split="train", target_type="attr", download=False, **kwargs):
            calls.append((split, target_type, download))
            self.root = root
            self.filename = list(names[split])

    monkeypatch.setattr(torchvision.datasets, "CelebA", FakeCelebA)
    splits = load_data({"dataset": "celeba", "root": str(tmp_path), "image_size": 64, "range": [-1, 1]}, seed=0)
    assert calls == [("train", [], False), ("valid", [], False), ("test", [], False)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 2, 1)
    ids = {"train": [0, 1, 2], "valid": [3, 4], "test": [5]}
    for split, part in (("train", splits.train), ("valid", splits.val), ("test", splits.test)):
        x = part.x
        assert x.shape == (len(ids[split]), 3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        for img, k in zip(x, ids[split]):
            unit = (img + 1) / 2 * 255  # back to pixel values
            # green is 20k everywhere: the red bands (green 0) were cropped away
            assert torch.allclose(unit[1], torch.full((64, 64), 20.0 * k), atol=0.6), (split, k)
            # the left and right halves of the square, away from the seam's bicubic ringing
            for c, left, right in ((0, 10, 200), (2, 100, 30)):
                assert torch.allclose(unit[c, :, :24], torch.full((64, 24), float(left)), atol=0.6)
                assert torch.allclose(unit[c, :, 40:], torch.full((64, 24), float(right)), atol=0.6)
    # sizes subsample each official part
    sub = load_data({"dataset": "celeba", "root": str(tmp_path), "image_size": 32, "split": {"train": 2, "test": 1}}, seed=0)
    assert (len(sub.train), len(sub.val), len(sub.test)) == (2, 2, 1)
    assert sub.train.x.shape[-2:] == (32, 32) and sub.train.x.min() >= 0  # range [0, 1] by default


# ---------------------------------------------------------------- 6. diff

def test_diff_larsen_to_beta_is_beta_and_the_tune_section():
    result = genspec_cli("diff", LARSEN, BETA, "--format", "json")
    assert result.returncode == 1, result.stderr
    diff = json.loads(result.stdout)
    assert [c["path"] for c in diff["changes"]] == [["params", "beta"], ["tune"]]
    assert diff["changes"][0]["a"] == 1.0 and diff["changes"][0]["b"] == 75.0
    assert diff["changes"][1]["kind"] == "added"
    assert diff["changes"][1]["b"]["beta"] == {"range": [1, 150], "points": [1, 50, 100, 150]}
    assert diff["networks"] == {}


def test_diff_vae_to_vaegan_adds_the_discriminator():
    result = genspec_cli("diff", CELEBA_VAE, LARSEN, "--format", "json")
    assert result.returncode == 1, result.stderr
    diff = json.loads(result.stdout)
    assert list(diff["networks"]) == ["dis"]
    assert diff["networks"]["dis"]["status"] == "added" and diff["networks"]["dis"]["trainable"] == 2_580_737
    assert [r["b"] for r in diff["networks"]["dis"]["rows"]][-1] == "fc 1, sigmoid"
    changes = {tuple(c["path"]): c for c in diff["changes"]}
    assert changes[("losses", "llike")]["kind"] == "changed"
    assert changes[("losses", "llike")]["b"] == "sqerr(dis.features(x_rec), dis.features(x)) / 2"
    assert changes[("losses", "gan")]["kind"] == "added"
    assert changes[("objectives", "vae")]["kind"] == "removed"
    assert {p for p in changes if p[0] == "objectives" and changes[p]["kind"] == "added"} == \
        {("objectives", "enc"), ("objectives", "dec"), ("objectives", "dis")}
    assert changes[("objectives", "dis")]["b"]["minimize"] == "gan"
    assert changes[("labels",)]["kind"] == "added"
    assert ("networks", "enc") not in changes and ("params", "beta") not in changes
    text = genspec_cli("diff", CELEBA_VAE, LARSEN)
    assert text.returncode == 1
    assert "network dis: added (trainable +2,580,737)" in text.stdout
    assert "losses.llike: sqerr(x_rec, x) / 2 -> sqerr(dis.features(x_rec), dis.features(x)) / 2" in text.stdout


# ---------------------------------------------------------------- 7. tuning beta

def _read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def _check_tune(out: Path) -> None:
    rows = _read_trials(out)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for row in rows:
        assert 1.0 <= float(row["beta"]) <= 150.0
        assert math.isfinite(float(row["value"]))
        trial = json.loads((out / row["folder"] / "metrics.json").read_text())
        assert trial["test"]["llike"] == pytest.approx(float(row["value"]))
        resolved = (out / row["folder"] / "spec.resolved.yaml").read_text()
        assert f"beta: {float(row['beta'])!r}" in resolved
    assert float(rows[0]["beta"]) != float(rows[1]["beta"])
    assert (out / "tune.md").is_file()


def test_tune_beta_quick(image_folder, tmp_path):
    """Two trials as in the command below (in-process), each one step on two images, without image grids."""
    out = tmp_path / "tune"
    quick = ["data.split.train=4", "data.split.test=2", "train.batch_size=2", "train.max_steps=1", "evaluate.grids=[]"]
    rc, stdout, stderr = genspec_main("tune", BETA, "--param", "beta", "--trials", 2, "--initial", 2, "--metric", "llike",
                                      "--out", out, "--no-progress", *image_overrides(image_folder),
                                      "--set", "evaluate.fid=null", *[a for q in quick for a in ("--set", q)])
    assert rc == 0, stderr
    assert "tune: best beta = " in stdout
    _check_tune(out)


@pytest.mark.slow
def test_tune_beta_two_trials(image_folder, tmp_path):
    out = tmp_path / "tune"
    result = genspec_cli("tune", BETA, "--param", "beta", "--trials", 2, "--initial", 2, "--metric", "llike",
                         "--out", out, "--no-progress", *image_overrides(image_folder), "--set", "evaluate.fid=null",
                         timeout=600)
    assert result.returncode == 0, result.stderr
    _check_tune(out)
    for row in _read_trials(out):
        assert (out / row["folder"] / "samples.png").is_file()


def test_show_prints_the_init_with_its_arguments():
    """Larsen et al. initialise from N(0, 0.02): the table says so, not just 'normal'."""
    from spec_helpers import cli_in_process

    rc, text, err = cli_in_process("show", LARSEN)
    assert rc == 0, err
    for name in ("enc", "dec", "dis"):
        assert f"{name}  (input " in text and "init normal(0, 0.02))" in text
    rc, text, _ = cli_in_process("show", LARSEN, "--json")
    assert json.loads(text)["networks"]["dis"]["init"] == "normal(0, 0.02)"
