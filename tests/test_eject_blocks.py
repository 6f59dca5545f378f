"""`genspec export --format python` of networks with blocks and skips: each block row an instance
of a generated class (one class per distinct block source, shared where a block is used alike),
`add NAME` and `concat NAME` reading earlier rows' outputs kept in local variables.

Three runs trained for one epoch on 32 of the 8x8 digits: the ResNet GAN of the zoo (residual
blocks with and without a shortcut, norm and activation after a block row), SKIPS below (nested
blocks, a concat skip, taps inside a block, spectral norm and a virtual batch norm inside blocks,
add and concat of top-level taps, a flat tap joined onto an image) and the zoo's VQ-VAE (its
codebook prior ejected as before blocks). Untrained networks cover the rest in process, and a
plugin layer is refused, in a table or inside a block.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import genspec
from genspec.graph.grids import generator_of
from genspec.measure.sampling import generator_parts, sample_images
from genspec.report.eject import EjectError, eject as eject_run
from genspec.train.finished import FinishedRun
from spec_helpers import REPO, cli_in_process as main
from test_export import assert_same_outputs, ejected_modules, pixels, run_sample_py

# A GAN of the 8x8 digits whose tables use every kind of skip (shapes in the comments).
SKIPS = f"""\
genspec: 1
name: tiny_skips
extends: {REPO / "specs" / "mnist_gan.yaml"}
data: {{dataset: digits, split: {{train: 64, test: 32}}}}
latent: {{z: {{shape: [8], prior: normal}}}}
blocks:
  dense:                        # joins its input and its conv's output along the channels
    params: {{k: 4}}
    layers: ["conv {{k}} 3x3, relu"]
    skip: concat
  pair:                         # nested blocks; a tap inside the block, named as the running tensor is
    params: {{k: null, ch: null}}
    layers: ["block dense k={{k}}  as h", "conv {{ch}} 3x3, vbn", add h, "block dense k={{k}}"]
  up:                           # a residual block with a shortcut
    params: {{ch: null}}
    layers: [upsample 2, "conv {{ch}} 3x3, bn, relu", "conv {{ch}} 3x3"]
    skip: add
    shortcut: [upsample 2, "conv {{ch}} 1x1"]
  res:                          # a residual block that adds its input as it is
    params: {{ch: null}}
    layers: ["conv {{ch}} 3x3, lrelu 0.2", "conv {{ch}} 3x3"]
    skip: add
networks:
  gen:
    input: z
    layers:
      - fc 16, relu  as code                  # 16
      - fc 4x4x8, relu  as base               # 8x4x4
      - block pair k=4 ch=12, bn, relu        # 8 -> 12 (dense) -> 12 (conv, add h) -> 16 (dense)
      - conv 8 1x1                            # 8x4x4
      - add base                              # 8x4x4
      - concat base                           # 16x4x4
      - concat code                           # 32x4x4: the flat tap as constant feature maps
      - block up ch=8, sn                     # 8x8x8, its convs spectrally normalised
      - conv 1 3x3, tanh
  dis:
    input: x
    layers:
      - conv 8 3x3 /2, lrelu 0.2  as f        # 8x4x4
      - block res ch=8, sn, lrelu 0.2
      - concat f                              # 16x4x4
      - flatten  as flat                      # 256
      - fc 16, lrelu 0.2
      - concat flat                           # 272
      - fc 1, sigmoid
train: {{epochs: 1, batch_size: 16, device: cpu}}
evaluate: {{grids: []}}
"""

RESNET_GAN = REPO / "specs" / "zoo" / "resnet_gan.yaml"
VQVAE = REPO / "specs" / "zoo" / "vqvae.yaml"
SMALL = ["--set", "train.epochs=1", "--set", "data.split={train: 32, test: 32}", "--set", "train.batch_size=32",
         "--set", "train.device=cpu", "--set", "evaluate.grids=[]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run's folder and its eject, trained and ejected on first use."""
    root = tmp_path_factory.mktemp("eject_blocks")
    done = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in done:
            path = {"resnet": RESNET_GAN, "vqvae": VQVAE}.get(kind)
            if path is None:
                path = root / "skips.yaml"
                path.write_text(SKIPS)
            rc, _, err = main("run", path, "--out", root / kind, "--no-progress", *SMALL)
            assert rc == 0, err
            rc, _, err = main("export", root / kind, "--format", "python", "--out", root / f"{kind}_ejected")
            assert rc == 0, err
            done[kind] = root / kind, root / f"{kind}_ejected"
        return done[kind]

    return get


@pytest.mark.parametrize("kind", ["resnet", "skips", "vqvae"])
def test_every_ejected_network_computes_the_runs_outputs(runs, kind):
    run_dir, folder = runs(kind)
    networks_py, _ = ejected_modules(folder)
    ejected, priors = networks_py.load()  # load_state_dict(strict=True): every tensor has its place
    run = genspec.load_run(run_dir)
    assert_same_outputs(run, ejected)
    if kind == "vqvae":  # the codebook travels as the prior's state
        assert torch.equal(priors["e.codes"], run.priors["e"].codes)


@pytest.mark.parametrize("kind", ["resnet", "skips", "vqvae"])
def test_the_ejected_sampler_draws_genspec_samples_very_images(runs, kind, tmp_path):
    run_dir, folder = runs(kind)
    result = run_sample_py(folder, "--n", 10, "--seed", 3, "--out", tmp_path / "ejected.png")  # no genspec there
    assert result.returncode == 0, result.stderr
    assert main("sample", run_dir, "--n", 10, "--seed", 3, "--out", tmp_path / "genspec.png")[0] == 0
    assert np.array_equal(pixels(tmp_path / "ejected.png"), pixels(tmp_path / "genspec.png"))
    _, sampler = ejected_modules(folder)
    run = genspec.load_run(run_dir)
    module, prior, conditions = generator_parts(run, generator_of(run.spec))
    torch.manual_seed(3)
    with torch.no_grad():
        expected = sample_images(module, prior, 10, "cpu", conditions)
    assert torch.equal(sampler.sample(10, seed=3), expected)


def imports_of(text: str) -> set:
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    return imported


def class_source(text: str, name: str) -> str:
    return next(ast.get_source_segment(text, node) for node in ast.parse(text).body
                if isinstance(node, ast.ClassDef) and node.name == name)


def test_the_resnet_gan_ejects_a_class_per_block_and_an_instance_per_block_row(runs):
    _, folder = runs("resnet")
    text = (folder / "networks.py").read_text()
    compile(text, "networks.py", "exec")
    assert imports_of(text) <= {"pathlib", "torch", "safetensors"}
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["UpBlock", "FirstBlock", "DownBlock", "ResBlock", "Gen", "Dis"]  # blocks before their users
    gen, up, res = class_source(text, "Gen"), class_source(text, "UpBlock"), class_source(text, "ResBlock")
    assert "self.up1 = UpBlock()" in gen and "self.up2 = UpBlock()" in gen  # `block up ch=64` twice: one class
    assert "# block up ch=64\n        h = self.up1(h)\n" in gen
    assert '"""`block up ch=64` of the spec, on 64 channels: its rows\' output plus its shortcut of the input."""' in up
    # the shortcut's `upsample 2, conv 64 1x1` as genspec computes it: one transposed convolution
    assert "shortcut = resize_conv(x, self.conv3.weight, self.conv3.bias, 2, (0, 0))" in up
    assert "def resize_conv(h, weight, bias, scale, padding):" in text
    assert "h = h + shortcut  # skip: add" in up
    assert "h = h + x  # skip: add" in res and "shortcut" not in res
    # the relu after `block res ch=64` is the critic's, after the block's call
    assert "# block res ch=64, relu\n        h = self.res1(h)\n        h = F.relu(h)\n" in class_source(text, "Dis")
    networks_py, _ = ejected_modules(folder)
    assert "up1.conv3.weight" in networks_py.Gen().state_dict() and "res1.conv2.bias" in networks_py.Dis().state_dict()


def test_nested_blocks_taps_and_skips_are_written_with_local_variables(runs):
    _, folder = runs("skips")
    text = (folder / "networks.py").read_text()
    compile(text, "networks.py", "exec")
    assert "genspec" not in imports_of(text) and "parametrizations" not in text
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    # `block dense k=4` on 8 channels, then on 12: two classes, before the block that uses them
    assert classes[:4] == ["VirtualBatchNorm", "DenseBlock", "DenseBlock2", "PairBlock"]
    dense, pair = class_source(text, "DenseBlock"), class_source(text, "PairBlock")
    gen, dis = class_source(text, "Gen"), class_source(text, "Dis")
    assert "h = torch.cat([x, h], dim=1)  # skip: concat, the input's channels first" in dense
    # the tap `h` of the block's first row is kept as h_ (h is the running tensor) and added after the conv
    assert "def forward(self, x, r):" in pair  # its virtual batch norm needs the reference size
    assert "on 8 channels" in dense and "on 12 channels" in class_source(text, "DenseBlock2")
    assert "self.dense1 = DenseBlock()" in pair and "self.dense2 = DenseBlock2()" in pair
    assert "h = self.dense1(x)\n        h_ = h  # the tap 'h', which a later row reads\n" in pair
    assert "h = self.vbn1(h, r)" in pair and "# add h\n        h = h + h_\n" in pair
    assert "h = self.pair1(h, r)\n        h = self.bn1(h)\n        h = F.relu(h)\n" in gen
    assert "base = h  # the tap 'base' (gen.base in the spec), which a later row reads" in gen and "h = h + base" in gen
    assert "h = torch.cat([h, base], dim=1)" in gen
    assert "h = torch.cat([h, code[:, :, None, None].expand(-1, -1, 4, 4)], dim=1)" in gen
    assert "# spectral norm: the weight as normalised in eval mode" in class_source(text, "UpBlock")
    assert "h = torch.cat([h, flat], dim=1)" in dis and "f = h  # the tap 'f' (dis.f in the spec)" in dis
    assert gen.endswith("return h[r:]") and dis.endswith("return h")  # the reference batch dropped from the generator's output


# ---------------------------------------------------------------- untrained networks, in process

def finished(text: str, folder: Path) -> FinishedRun:
    """A run of the spec as built, not trained: its networks in eval mode."""
    (folder / "spec.yaml").write_text(text)
    spec = genspec.load(folder / "spec.yaml")
    torch.manual_seed(0)
    networks = {name: module.eval() for name, module in genspec.build(spec).items()}
    return FinishedRun(Path("untrained"), spec, networks, {}, {}, 0)


def ejected_of(text: str, tmp_path: Path) -> tuple[FinishedRun, str, dict]:
    run = finished(text, tmp_path)
    eject_run(run, tmp_path / "out", genspec.__version__)
    assert not (tmp_path / "out" / "sample.py").exists()  # nothing there maps latent draws to images
    sys.path.insert(0, str(tmp_path / "out"))
    try:
        sys.modules.pop("networks", None)
        ejected, _ = importlib.import_module("networks").load()
    finally:
        sys.path.remove(str(tmp_path / "out"))
        sys.modules.pop("networks", None)
    return run, (tmp_path / "out" / "networks.py").read_text(), ejected


EDGES = """\
genspec: 1
name: edges
data: {dataset: digits, labels: true, split: {train: 64, test: 32}}
blocks:
  res:
    params: {ch: null, stride: 1}
    layers: ["conv {ch} 3x3 /{stride}, relu  as x", "conv {ch} 3x3  as shortcut", add x, add shortcut]
    skip: add
    shortcut: ["conv {ch} 1x1 /{stride}"]
networks:
  res_block:                     # its class is ResBlock: the block's class takes another name
    input: x
    condition: {label: y}
    layers: ["concat label, lrelu 0.2", "block res ch=11", "block res ch=8 stride=2, bn", flatten, "fc 16  as h",
             "fc 16", add h, fc 64, reshape 1 8 8, "block res ch=1, sigmoid"]
graph: {x_rec: "res_block(x, onehot(y))"}
losses: {rec: "mse(x_rec, x)"}
objectives: {res_block: {minimize: rec, optimizer: adam(1e-3)}}
train: {epochs: 1, batch_size: 16, seed: 0, device: cpu}
"""


def test_edges_reserved_tap_names_block_variants_a_closing_sigmoid_and_a_condition_with_an_activation(tmp_path):
    run, text, ejected = ejected_of(EDGES, tmp_path)
    assert_same_outputs(run, ejected)
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["ResBlock2", "ResBlock3", "ResBlock4", "ResBlock"]  # three variants, then the network
    first = class_source(text, "ResBlock2")
    assert "x_ = h" in first and "shortcut_ = h" in first and "h = h + x_" in first and "h = h + shortcut_" in first
    assert "h = h + x  # skip: add" in first  # no shortcut where the shapes agree
    assert "shortcut = self.conv3(x)" in class_source(text, "ResBlock3")
    network = class_source(text, "ResBlock")
    # the activation after a condition's concat, and the sigmoid TableNet applies after the last block
    assert "h = torch.cat([x, label[:, :, None, None].expand(-1, -1, 8, 8)], dim=1)\n        h = F.leaky_relu(h, 0.2)" in network
    assert network.rstrip().endswith("h = self.res3(h)\n        h = torch.sigmoid(h)\n        return h")


def test_a_plugin_layer_is_refused_at_the_top_level_and_inside_a_block(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    plugged = SKIPS.replace("genspec: 1\n", "genspec: 1\nplugins: [genspec_example_ops]\n")
    for old, new, where in [
        ('"conv {k} 3x3, relu"', '"conv {k} 3x3, relu", pixelnorm', "row 2.0.1 (pixelnorm) inside row 2 (block pair k=4 ch=12, bn, relu)"),
        ("- conv 8 1x1", "- pixelnorm\n      - conv 8 1x1", "row 3 (pixelnorm)"),
    ]:
        assert plugged.count(old) == 1
        with pytest.raises(EjectError) as caught:
            eject_run(finished(plugged.replace(old, new), tmp_path), tmp_path / "out", genspec.__version__)
        message = str(caught.value)
        assert f"network 'gen', {where}: it has no writer for a genspec_example_ops.PixelNorm module" in message
        assert "\n" not in message and not (tmp_path / "out").exists()
