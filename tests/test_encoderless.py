"""The "Who Needs an Encoder?" features: frozen encoders (PNL, NL, RKS) that stay bit-identical
while the rest trains, frozen rows' batch norm, fixed-variance Gaussian heads (dense and
convolutional), the data pools the thesis draws its splits from, and SVHN's missing-data message.

The study's runs are built from specs/encoderless/mnist_study.yaml and trained on small random
batches (no data needed); the pool tests read MNIST from $GENSPEC_DATA and are skipped, with the
reason, when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import genspec
from genspec.compiler.model import Model
from genspec.data.datasets import load_data
from genspec.errors import RunError
from genspec.compiler.layers import ConvGaussianHead, GaussianHead, build_row
from genspec.graph.pipeline import load_runs
from genspec.lang.rows import parse_row
from genspec.lang.shapes import infer_network
from spec_helpers import cli_in_process as run_cli

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "specs" / "encoderless" / "mnist_study.yaml"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")




@pytest.fixture(scope="module")
def study():
    return {run.id: spec for run, spec in load_runs(STUDY)}


@pytest.fixture(scope="module")
def shown_study():
    rc, out, err = run_cli("show", STUDY, "--json")
    assert rc == 0, err
    return json.loads(out)["runs"]


# ---------------------------------------------------------------- frozen encoders

# run id -> the enc rows (by index) that must be frozen
FROZEN_CASES = {
    "layers=fc,prior=normal,encoder=PNL": {1, 2, 3},          # all but the gaussian head
    "layers=fc,prior=flow2,encoder=NL": {1, 2, 3, 4},         # all, the head fixed-variance
    "layers=conv,prior=normal,encoder=RKS": {0},              # one frozen 16x16 /16 conv head
    "layers=conv,prior=flow6,encoder=PNL": {0, 2, 4},         # convs frozen, the conv head trains
    "layers=conv,prior=normal,encoder=L": set(),
}


def snapshot(model: Model) -> dict:
    named = [*model.networks.named_parameters(), *(("prior." + n, p) for n, p in model.priors.named_parameters())]
    return {name: p.detach().clone() for name, p in named}


def enc_row_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[0] == "enc" and parts[1] == "rows" else None


@pytest.mark.parametrize("run_id", list(FROZEN_CASES))
def test_frozen_encoder_rows_stay_bit_identical_while_the_rest_trains(study, run_id):
    spec = study[run_id]
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    model.train(True)
    before = snapshot(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        losses = model.step(model.phases[0], torch.rand(8, 1, 32, 32, generator=g))
        assert all(torch.isfinite(v) for v in losses.values())
    after = snapshot(model)
    frozen_rows = FROZEN_CASES[run_id]
    info_rows = spec.networks["enc"].info.rows
    assert {r.index for r in info_rows if r.frozen and r.params} == frozen_rows
    in_optimiser = {id(p) for run in model.objectives.values() for group in run.optimizer.param_groups for p in group["params"]}
    params = dict([*model.networks.named_parameters(), *(("prior." + n, p) for n, p in model.priors.named_parameters())])
    for name, p in params.items():
        row = enc_row_of(name)
        if row is not None and row in frozen_rows:
            assert not p.requires_grad and id(p) not in in_optimiser, name
            assert torch.equal(before[name], after[name]), f"{name} moved although frozen"
        else:
            assert p.requires_grad and id(p) in in_optimiser, name
            assert not torch.equal(before[name], after[name]), f"{name} did not move"
    if "prior=flow" in run_id:
        assert any(n.startswith("prior.") for n in params), "the flow prior has parameters that train"


@pytest.mark.parametrize("run_id", list(FROZEN_CASES))
def test_show_json_counts_equal_the_built_modules(study, shown_study, run_id):
    spec = study[run_id]
    torch.manual_seed(0)
    nets = genspec.build(spec)
    for name, module in nets.items():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        shown = shown_study[run_id]["networks"][name]
        assert (shown["trainable"], shown["frozen"]) == (trainable, frozen), name
        assert sum(r["trainable"] for r in shown["rows"]) == trainable
    enc = shown_study[run_id]["networks"]["enc"]
    if FROZEN_CASES[run_id]:
        assert enc["frozen"] > 0
    if "encoder=NL" in run_id or "encoder=RKS" in run_id:
        assert enc["trainable"] == 0


def test_study_encoders_have_the_thesis_shapes(study):
    nl = study["layers=fc,prior=normal,encoder=NL"].networks["enc"]
    assert nl.rows[-1] == {"op": "gaussian", "out": 16, "var": 1e-6}
    assert nl.info.trainable == 0 and nl.info.frozen == 256 * 1024 + 256 + 128 * 256 + 128 + 64 * 128 + 64 + 16 * 64 + 16
    rks = study["layers=conv,prior=normal,encoder=RKS"].networks["enc"]
    assert [r["op"] for r in rks.rows] == ["gaussian"] and rks.info.output == (4, 2, 2)
    assert rks.info.frozen == 4 * 16 * 16 + 4 and rks.info.trainable == 0
    rks_fc = study["layers=fc,prior=normal,encoder=RKS"].networks["enc"]
    assert rks_fc.info.frozen == 1024 * 16 + 16 and rks_fc.info.output == (16,)
    pnl = study["layers=fc,prior=normal,encoder=PNL"].networks["enc"]
    assert pnl.info.trainable == 64 * 32 + 32  # only the head: mean and log-variance of 16


FROZEN_BN = textwrap.dedent("""\
    genspec: 1
    name: frozen_bn
    data: {dataset: digits, split: {train: 64, test: 32}}
    latent:
      z: {shape: [2]}
    networks:
      enc:
        input: x
        freeze: all_but_last
        layers: [flatten, "fc 16, bn, relu", bn, "fc 8, relu", gaussian 2]
      dec:
        input: z
        layers: ["fc 16, bn, relu", "fc 64, sigmoid", reshape 1 8 8]
    graph:
      q: enc(x)
      z: rsample(q)
      x_rec: dec(z)
    losses:
      rec: sqerr(x_rec, x)
      kl: kl(q, z)
    objectives:
      vae: {networks: [enc, dec], minimize: rec + kl, optimizer: adam(1e-2)}
    train: {epochs: 1, batch_size: 16, device: cpu}
    """)


def test_frozen_rows_batch_norm_keeps_its_running_statistics(tmp_path):
    path = tmp_path / "frozen_bn.yaml"
    path.write_text(FROZEN_BN)
    spec = genspec.load(path)
    assert [r.frozen for r in spec.networks["enc"].info.rows] == [False, True, True, True, False]
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    model.train(True)
    enc, dec = model.networks["enc"], model.networks["dec"]
    enc_bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm1d)]
    dec_bns = [m for m in dec.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(enc_bns) == 2 and len(dec_bns) == 1
    assert not any(m.training for m in enc_bns) and all(m.training for m in dec_bns)
    buffers = {k: v.clone() for k, v in model.networks.state_dict().items() if "running" in k or "num_batches" in k}
    x = load_data(spec.data, 0).train.x
    for start in range(0, 48, 16):
        model.step(model.phases[0], x[start:start + 16])
    now = model.networks.state_dict()
    for key, value in buffers.items():
        if key.startswith("enc."):
            assert torch.equal(now[key], value), f"{key} changed in a frozen row"
        else:
            assert not torch.equal(now[key], value), f"{key} did not track the batches"
    # in train mode a frozen row is a fixed function of its input: the batch does not change it
    h = enc.rows[0](x[:16])
    alone = enc.rows[1](h[:1])
    assert torch.allclose(enc.rows[1](h)[:1], alone)
    model.train(False)
    model.train(True)
    assert not any(m.training for m in enc_bns), "train(True) must keep frozen batch norm in eval mode"


# ---------------------------------------------------------------- fixed-variance heads

def head(text: str, in_shape: tuple):
    row = parse_row(text)
    info = infer_network(in_shape, [row])
    torch.manual_seed(0)
    return row, info, build_row(row, in_shape, info.output)


def test_dense_gaussian_head_with_fixed_variance():
    row, info, module = head("gaussian 16 var=1e-6", (64,))
    assert isinstance(module, GaussianHead) and info.output == (16,)
    assert sum(p.numel() for p in module.parameters()) == info.rows[0].params == 64 * 16 + 16
    x = torch.randn(5, 64)
    q = module(x)
    assert q.mean.shape == q.logvar.shape == (5, 16)
    assert torch.equal(q.logvar, torch.full((5, 16), math.log(1e-6)))
    assert module.linear.out_features == 16 and torch.equal(q.mean, module.linear(x))  # mean only
    torch.manual_seed(1)
    with torch.no_grad():
        draw = q.rsample() - q.mean
    assert 1e-4 < float(draw.std()) < 1e-2  # standard deviation 1e-3


def test_dense_gaussian_head_without_variance_splits_mean_and_log_variance():
    row, info, module = head("gaussian 16", (64,))
    assert info.rows[0].params == sum(p.numel() for p in module.parameters()) == 64 * 32 + 32
    x = torch.randn(5, 64)
    h = module.linear(x)
    q = module(x)
    assert q.mean.shape == q.logvar.shape == (5, 16)
    assert torch.equal(q.mean, h[:, :16]) and torch.equal(q.logvar, h[:, 16:])


@pytest.mark.parametrize("text, in_shape, params", [
    ("gaussian 4 3x3 valid var=1e-6", (16, 4, 4), 4 * 16 * 9 + 4),
    ("gaussian 4 16x16 /16 valid var=1e-6", (1, 32, 32), 4 * 256 + 4),
])
def test_conv_gaussian_head_with_fixed_variance(text, in_shape, params):
    row, info, module = head(text, in_shape)
    assert isinstance(module, ConvGaussianHead) and info.output == (4, 2, 2)
    assert sum(p.numel() for p in module.parameters()) == info.rows[0].params == params
    x = torch.randn(3, *in_shape)
    q = module(x)
    assert q.mean.shape == q.logvar.shape == (3, 4, 2, 2)
    assert torch.equal(q.logvar, torch.full((3, 4, 2, 2), math.log(1e-6)))
    conv = [m for m in module.modules() if isinstance(m, nn.Conv2d)][0]
    assert conv.out_channels == 4  # mean only
    k, s = row["kernel"], row["stride"]
    # the mean at output (1, 0) is the kernel applied to its own valid window
    window = x[:, :, s: s + k, 0:k]
    by_hand = (window.unsqueeze(1) * conv.weight.unsqueeze(0)).flatten(2).sum(2) + conv.bias
    torch.testing.assert_close(q.mean[:, :, 1, 0], by_hand, atol=1e-5, rtol=1e-5)


def test_conv_gaussian_head_without_variance_splits_channels():
    row, info, module = head("gaussian 4 3x3 valid", (16, 4, 4))
    assert info.rows[0].params == sum(p.numel() for p in module.parameters()) == 8 * 16 * 9 + 8
    x = torch.randn(3, 16, 4, 4)
    h = module.conv(x)
    q = module(x)
    assert h.shape == (3, 8, 2, 2) and q.mean.shape == (3, 4, 2, 2)
    assert torch.equal(q.mean, h[:, :4]) and torch.equal(q.logvar, h[:, 4:])


# ---------------------------------------------------------------- data pools

def mnist_root() -> Path:
    root = os.environ.get("GENSPEC_DATA")
    if not root:
        pytest.skip("mnist: GENSPEC_DATA is not set; point it at the folder holding MNIST/raw")
    raw = Path(root) / "MNIST" / "raw"
    if not all((raw / f).exists() or (raw / f"{f}.gz").exists() for f in MNIST_FILES):
        pytest.skip(f"mnist: the files {', '.join(MNIST_FILES)} are absent under {raw}")
    return Path(root)


@pytest.fixture(scope="module")
def mnist_hashes():
    import torchvision

    root = mnist_root()
    sets = []
    for train in (True, False):
        data = torchvision.datasets.MNIST(str(root), train=train, download=False).data
        sets.append({image.numpy().tobytes() for image in data})
    return root, sets[0], sets[1]


def keys(split) -> list[bytes]:
    return [image.numpy().tobytes() for image in (split.x[:, 0] * 255).round().to(torch.uint8)]


def mnist(root: Path, pool: str | None, split: dict) -> dict:
    data = {"dataset": "mnist", "root": str(root), "download": False, "split": split}
    if pool:
        data["pool"] = pool
    return data


def test_pool_train_draws_every_split_from_the_training_set(mnist_hashes):
    root, train_set, test_set = mnist_hashes
    splits = load_data(mnist(root, "train", {"train": 300, "val": 100, "test": 200}), 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 100, 200)
    parts = [keys(splits.train), keys(splits.val), keys(splits.test)]
    for part in parts:
        assert all(k in train_set for k in part) and not any(k in test_set for k in part)
    everything = [k for part in parts for k in part]
    assert len(set(everything)) == len(everything), "the splits overlap"
    assert splits.test.y is not None and len(splits.test.y) == 200
    with pytest.raises(RunError, match="60000"):
        load_data(mnist(root, "train", {"train": 40000, "val": 10000, "test": 10001}), 0)


def test_pool_official_tests_on_the_test_set_and_all_merges_both(mnist_hashes):
    root, train_set, test_set = mnist_hashes
    official = load_data(mnist(root, None, {"train": 200, "test": 300}), 0)
    assert all(k in test_set for k in keys(official.test))
    assert all(k in train_set for k in keys(official.train))
    merged = load_data(mnist(root, "all", {"train": 1000, "val": 0, "test": 1500}), 0)
    assert (len(merged.train), len(merged.test), merged.val) == (1000, 1500, None)
    for split in (merged.train, merged.test):
        ks = keys(split)
        from_test = sum(k in test_set for k in ks)
        assert all(k in train_set or k in test_set for k in ks)
        assert 0 < from_test < len(ks), "a merged pool draws from both official sets"  # ~1/7 expected
    assert not set(keys(merged.train)) & set(keys(merged.test))


def test_pool_splits_are_seeded(mnist_hashes):
    root, _, _ = mnist_hashes
    data = mnist(root, "train", {"train": 100, "val": 20, "test": 50})
    a, b, c = load_data(data, 0), load_data(data, 0), load_data(data, 1)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x) and torch.equal(getattr(a, name).y, getattr(b, name).y)
        assert not torch.equal(getattr(a, name).x, getattr(c, name).x)


def test_the_base_spec_pads_mnist_to_32(mnist_hashes):
    root, _, _ = mnist_hashes
    spec = genspec.load(ROOT / "specs" / "encoderless" / "mnist_base.yaml",
                        [f"data.root={root}", "data.split.train=20", "data.split.val=5", "data.split.test=10"])
    assert spec.data_shape == (1, 32, 32) and spec.data["pool"] == "train"
    splits = load_data(spec.data, 0)
    assert splits.train.x.shape == (20, 1, 32, 32)
    border = torch.cat([splits.train.x[..., :2, :].flatten(), splits.train.x[..., :, -2:].flatten()])
    assert float(border.abs().max()) == 0.0


def test_missing_svhn_names_the_files(tmp_path):
    with pytest.raises(RunError) as info:
        load_data({"dataset": "svhn", "root": str(tmp_path), "split": {"train": 10, "test": 10}}, 0)
    message = str(info.value)
    assert "train_32x32.mat" in message and "test_32x32.mat" in message and str(tmp_path.resolve()) in message


def test_each_study_run_reports_only_its_own_cell_of_the_thesis():
    from genspec.graph.pipeline import load_runs

    folder = STUDY.parent
    svhn = {run.id: spec.source.get("reported") for run, spec in load_runs(str(folder / "svhn_study.yaml"), [], [])}
    assert svhn["encoder=NL"] == {"nelbo": -62.60, "rec": 27.69, "rt": 90.30, "fid": 78.08}  # Table 5.10
    assert len({str(v) for v in svhn.values()}) == 4
    # the MNIST base's numbers are the FC / normal / L cell; no study run compares itself with them
    assert all(spec.source.get("reported") is None
               for _, spec in load_runs(str(STUDY), [], []))
