"""`genspec export`: a finished run as one safetensors file (load_run and sample read it), and
ejected as plain PyTorch source whose sample.py draws `genspec sample`'s very images.

Five tiny runs on the 8x8 digits, one epoch each: the quick-start VAE, the course report's GAN
(an even-kernel conv: asymmetric 'same' padding), the conditional GAN (a categorical latent,
`concat` rows, virtual batch norm), the VAE-GAN (batch norm everywhere, a Gaussian head, a tap)
and the SN-GAN (spectral norm on the discriminator).
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genspec
from genspec.errors import RunError
from genspec.graph.grids import generator_of
from genspec.measure.sampling import generator_parts, sample_images
from spec_helpers import TINY_CONDITIONAL_GAN, cli_in_process as main

REPO = Path(__file__).resolve().parent.parent

TINY_GAN = f"""\
genspec: 1
name: tiny_mnist_gan
extends: {REPO / "specs" / "mnist_gan.yaml"}
data: {{dataset: digits, split: {{train: 64, test: 32}}}}
latent: {{z: {{shape: [8], prior: normal}}}}
networks:
  gen: {{input: z, layers: ["fc 2x2x8, lrelu 0.2", "fc 2x2x16, lrelu 0.2", "deconv 8 5x5 x2, lrelu 0.2", "deconv 1 5x5 x2, tanh"]}}
  dis: {{input: x, layers: ["conv 4 5x5 /2, lrelu 0.2", "conv 8 4x4, lrelu 0.2", flatten, "fc 1, sigmoid"]}}
train: {{epochs: 1, batch_size: 16, device: cpu}}
evaluate: {{grids: []}}
"""

TINY_VAEGAN = f"""\
genspec: 1
name: tiny_vaegan
extends: {REPO / "specs" / "larsen_vaegan.yaml"}
data: {{dataset: digits, image_size: null, split: {{train: 64, test: 32}}}}
latent: {{z: {{shape: [4], prior: normal}}}}
networks:
  enc: {{input: x, init: "normal(0, 0.02)", layers: ["conv 4 5x5 /2, bn, relu", "fc 16, bn, relu", gaussian 4]}}
  dec: {{input: z, init: "normal(0, 0.02)", layers: ["fc 4x4x8, bn, relu", "deconv 4 5x5 x2, bn, relu", "conv 1 5x5, tanh"]}}
  dis: {{input: x, init: "normal(0, 0.02)", layers: ["conv 4 4x4, relu", "conv 8 5x5 /2, bn, relu  as features", "fc 1, sigmoid"]}}
train: {{epochs: 1, batch_size: 16, device: cpu}}
evaluate: {{grids: [], fid: null, extractor: null, reference: null}}
"""

SMALL = ["--set", "train.device=cpu", "--set", "train.epochs=1", "--set", "data.split.train=64",
         "--set", "data.split.test=32", "--set", "train.batch_size=16", "--set", "evaluate.grids=[]"]
SPECS = {"vae": (REPO / "specs" / "quickstart.yaml", None), "gan": (None, TINY_GAN),
         "cgan": (None, TINY_CONDITIONAL_GAN), "vaegan": (None, TINY_VAEGAN),
         "sngan": (REPO / "specs" / "zoo" / "sngan.yaml", None)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each kind's run folder, trained on first use."""
    root = tmp_path_factory.mktemp("export")
    trained = {}

    def get(kind: str) -> Path:
        if kind not in trained:
            path, text = SPECS[kind]
            if text is not None:
                path = root / f"{kind}.yaml"
                path.write_text(text)
            rc, _, err = main("run", path, "--out", root / kind, "--no-progress", *SMALL)
            assert rc == 0, err
            trained[kind] = root / kind
        return trained[kind]

    return get


def export_file(run_dir: Path) -> Path:
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    if not out.exists():
        rc, stdout, err = main("export", run_dir, "--out", out)
        assert rc == 0, err
    return out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def inputs_for(spec, name: str, n: int = 5) -> list:
    """Seeded inputs of a network: a batch of its input and of each condition (one-hot for labels)."""
    g = torch.Generator().manual_seed(1)
    net = spec.networks[name]
    out = [torch.randn((n, *net.input), generator=g)]
    for shape, _ in net.conditions.values():
        out.append(torch.nn.functional.one_hot(torch.randint(shape[0], (n,), generator=g), shape[0]).float())
    return out


def outputs(module, args) -> list:
    with torch.no_grad():
        out = module(*args)
    if hasattr(out, "mean") and hasattr(out, "logvar"):
        return [out.mean, out.logvar]
    return list(out) if isinstance(out, tuple) else [out]


# ---------------------------------------------------------------------------- safetensors


def test_the_file_holds_every_tensor_under_network_keys_and_the_spec_in_its_metadata(runs):
    from safetensors import safe_open

    run_dir = runs("cgan")
    path = export_file(run_dir)
    run = genspec.load_run(run_dir)
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert metadata["format"] == "genspec-run"
    assert metadata["spec"] == (run_dir / "spec.resolved.yaml").read_text()
    assert metadata["genspec_version"] == genspec.__version__ and metadata["epoch"] == "1"
    expected = {f"{name}.{key}" for name, net in run.networks.items() for key in net.state_dict()}
    assert "gen.rows.1.linear.weight" in expected and "gen.reference_1" in expected  # the VBN's reference batches
    assert keys == expected | {"prior.c.weights"}
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, tensor in state["networks"].items():
        assert torch.equal(tensors[key], tensor), key
    assert torch.equal(tensors["prior.c.weights"], state["priors"]["c.weights"])


@pytest.mark.parametrize("kind", ["vae", "cgan", "sngan"])
def test_load_run_of_the_file_is_the_run_of_the_folder(runs, kind):
    run_dir = runs(kind)
    folder, file = genspec.load_run(run_dir), genspec.load_run(export_file(run_dir))
    assert (file.spec.name, file.epoch, file.metrics) == (folder.spec.name, folder.epoch, folder.metrics)
    assert file.folder == export_file(run_dir)
    for name in folder.networks:
        args = inputs_for(folder.spec, name)
        for a, b in zip(outputs(folder.networks[name], args), outputs(file.networks[name], args)):
            assert torch.equal(a, b), name
    for name in folder.priors:
        for key, tensor in folder.priors[name].state_dict().items():
            assert torch.equal(file.priors[name].state_dict()[key], tensor)


def test_sample_from_the_file_equals_sample_from_the_folder(runs, tmp_path):
    run_dir = runs("cgan")
    file = export_file(run_dir)
    for args in ([], ["--label", "3"], ["--interpolate"]):
        assert main("sample", run_dir, "--n", 12, "--seed", 4, "--out", tmp_path / "a.png", *args)[0] == 0
        rc, _, err = main("sample", file, "--n", 12, "--seed", 4, "--out", tmp_path / "b.png", *args)
        assert rc == 0, err
        assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # without --out, the grid lands beside the file
    assert main("sample", file, "--n", 4)[0] == 0
    assert (file.parent / "samples_new.png").exists()


def test_batch_norm_statistics_and_spectral_norm_state_are_exported(runs):
    from safetensors import safe_open

    for kind, wanted in (("vaegan", ["enc.rows.0.1.running_mean", "enc.rows.0.1.running_var",
                                     "enc.rows.0.1.num_batches_tracked", "dec.rows.0.post.0.running_var"]),
                         ("sngan", ["dis.rows.0.0.parametrizations.weight.original",
                                    "dis.rows.0.0.parametrizations.weight.0._u",
                                    "dis.rows.0.0.parametrizations.weight.0._v",
                                    "gen.rows.0.post.0.running_mean"])):
        run_dir = runs(kind)
        run = genspec.load_run(run_dir)
        state = {f"{n}.{k}": v for n, net in run.networks.items() for k, v in net.state_dict().items()}
        with safe_open(str(export_file(run_dir)), framework="pt") as f:
            for key in wanted:
                assert torch.equal(f.get_tensor(key), state[key]), key
        # trained statistics, not the initial ones
        assert state[wanted[0 if kind == "vaegan" else 3]].abs().sum() > 0


def test_a_file_that_is_not_a_genspec_export_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RunError, match="is not a run exported by genspec"):
        genspec.load_run(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    rc, _, err = main("sample", tmp_path / "cut.safetensors", "--out", tmp_path / "x.png")
    assert rc == 1 and "cannot be read as safetensors" in err and len(err.strip().splitlines()) == 1
    rc, _, err = main("export", tmp_path / "missing", "--out", tmp_path / "y.safetensors")
    assert rc == 1 and "not a finished genspec run" in err


# ---------------------------------------------------------------------------- eject


def eject(run_dir: Path, *more) -> Path:
    out = run_dir.parent / f"{run_dir.name}_ejected"
    if not out.exists() or more:
        rc, _, err = main("export", run_dir, "--format", "python", "--out", out, *more)
        assert rc == 0, err
    return out


def ejected_modules(folder: Path) -> tuple:
    """networks.py and sample.py of an eject, imported afresh (each eject has modules of those names)."""
    sys.path.insert(0, str(folder))
    try:
        for name in ("networks", "sample"):
            sys.modules.pop(name, None)
        return importlib.import_module("networks"), importlib.import_module("sample")
    finally:
        sys.path.remove(str(folder))
        for name in ("networks", "sample"):
            sys.modules.pop(name, None)


def run_sample_py(folder: Path, *args) -> subprocess.CompletedProcess:
    """sample.py as a user runs it, where genspec cannot be imported (not on the path, and blocked
    in case an installed copy is)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import runpy, sys; sys.modules['genspec'] = None; sys.argv = ['sample.py', *sys.argv[1:]]; "
            "runpy.run_path('sample.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("kind", ["vae", "gan", "cgan", "vaegan"])
def test_the_ejected_sampler_draws_genspec_samples_very_images(runs, kind, tmp_path):
    run_dir = runs(kind)
    folder = eject(run_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "networks.py", "sample.py", "weights.safetensors"]
    # the same grid file, from a process that has no genspec
    result = run_sample_py(folder, "--n", 10, "--seed", 7, "--out", tmp_path / "ejected.png")
    assert result.returncode == 0, result.stderr
    assert main("sample", run_dir, "--n", 10, "--seed", 7, "--out", tmp_path / "genspec.png")[0] == 0
    assert np.array_equal(pixels(tmp_path / "ejected.png"), pixels(tmp_path / "genspec.png"))
    # and the same tensor, bit for bit
    _, sampler = ejected_modules(folder)
    run = genspec.load_run(run_dir)
    module, prior, conditions = generator_parts(run, generator_of(run.spec))
    torch.manual_seed(7)
    with torch.no_grad():
        expected = sample_images(module, prior, 10, "cpu", conditions)
    assert torch.equal(sampler.sample(10, seed=7), expected)


def test_the_ejected_conditional_sampler_takes_a_label_and_interpolates(runs, tmp_path, monkeypatch, capsys):
    run_dir = runs("cgan")
    folder = eject(run_dir)
    args = ["--interpolate", "--label", 2]
    result = run_sample_py(folder, "--n", 12, "--seed", 5, "--out", tmp_path / "e.png", *args)
    assert result.returncode == 0, result.stderr
    assert main("sample", run_dir, "--n", 12, "--seed", 5, "--out", tmp_path / "g.png", *args)[0] == 0
    assert np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "g.png"))
    # in this process: --label alone, interpolations with drawn labels, and a class out of range
    _, sampler = ejected_modules(folder)
    for args in (["--label", "7"], ["--interpolate"]):
        common = ["--n", "12", "--seed", "5", *args]
        assert main("sample", run_dir, *common, "--out", tmp_path / "g2.png")[0] == 0
        monkeypatch.setattr(sys, "argv", ["sample.py", *common, "--out", str(tmp_path / "e2.png")])
        sampler.main()
        assert np.array_equal(pixels(tmp_path / "e2.png"), pixels(tmp_path / "g2.png")), args
    monkeypatch.setattr(sys, "argv", ["sample.py", "--label", "10", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as stopped:
        sampler.main()
    assert stopped.value.code == 2 and "--label 10: the condition 'c' has classes 0 to 9" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kind", ["vae", "gan", "cgan", "vaegan", "sngan"])
def test_every_ejected_network_computes_the_runs_outputs(runs, kind):
    """Encoders (mean, logvar), discriminators (batch norm, spectral norm, conditions) too; strict state dicts."""
    run_dir = runs(kind)
    folder = eject(run_dir)
    networks_py, _ = ejected_modules(folder)
    ejected, _ = networks_py.load()  # load_state_dict(strict=True) inside
    assert_same_outputs(genspec.load_run(run_dir), ejected)


def assert_same_outputs(run, ejected: dict) -> None:
    """Every ejected network, in eval mode, gives the run's network's outputs exactly."""
    assert set(ejected) == set(run.networks)
    for name, module in run.networks.items():
        assert not ejected[name].training
        args = inputs_for(run.spec, name)
        for a, b in zip(outputs(module, args), outputs(ejected[name], args), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["vaegan", "cgan", "sngan"])
def test_the_ejected_source_is_plain_readable_pytorch(runs, kind):
    folder = eject(runs(kind))
    for file in ("networks.py", "sample.py"):
        text = (folder / file).read_text()
        compile(text, file, "exec")
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert imported <= {"argparse", "math", "pathlib", "torch", "torchvision", "safetensors", "networks"}, imported
        assert "genspec" not in imported
    source = (folder / "networks.py").read_text()
    if kind == "vaegan":  # named layers, written out; the Gaussian head's mean and log-variance
        assert "class Enc(nn.Module):" in source and "class Dis(nn.Module):" in source
        assert "self.conv1 = nn.Conv2d(1, 4, 5, stride=2, padding=2)" in source
        assert "self.bn1 = nn.BatchNorm2d(4)" in source
        assert "h = F.pad(x, (1, 2, 1, 2))" in source  # 'same' for the 4x4 kernel: one pixel more right and bottom
        assert "mean, logvar = h.chunk(2, dim=1)" in source and "return mean, logvar" in source
        assert "h = h.reshape(-1, 8, 4, 4)" in source and "# the tap 'features'" in source
        assert "VirtualBatchNorm" not in source  # helpers only where needed
    if kind == "cgan":
        assert "class VirtualBatchNorm(nn.Module):" in source and "def forward(self, z, label):" in source
        assert "h = torch.cat([x, label[:, :, None, None].expand(-1, -1, 8, 8)], dim=1)" in source
        assert "return h[r:]" in source
    if kind == "sngan":
        assert "parametrizations" not in source and "# spectral norm: the weight as normalised in eval mode" in source


def test_the_ejected_weights_are_the_modules_state_dicts(runs):
    from safetensors.torch import load_file

    folder = eject(runs("vaegan"))
    networks_py, _ = ejected_modules(folder)
    weights = load_file(str(folder / "weights.safetensors"))
    keys = {f"{name}.{k}" for name, cls in networks_py.NETWORKS.items() for k in cls().state_dict()}
    assert set(weights) == keys
    assert "enc.bn1.running_mean" in keys and "enc.gaussian1.weight" in keys and "dis.fc1.weight" in keys


def test_what_the_eject_cannot_write_is_refused_in_one_line(runs, tmp_path):
    from genspec.report.eject import EjectError, eject as eject_run

    class Plugin(torch.nn.Module):
        def forward(self, x):
            return x * 2

    run = genspec.load_run(runs("vae"))
    run.networks["dec"].rows[1] = torch.nn.Sequential(run.networks["dec"].rows[1], Plugin())
    with pytest.raises(EjectError) as caught:
        eject_run(run, tmp_path / "out", genspec.__version__)
    message = str(caught.value)
    assert "network 'dec', row 1 (fc 128, relu)" in message and "no writer for" in message and "Plugin" in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    run = genspec.load_run(runs("vae"))
    run.spec.latents["z"].prior = "realnvp"  # a flow prior: sample.py has no draw for it
    with pytest.raises(EjectError, match="latent 'z' has a realnvp prior, which sample.py cannot draw from"):
        eject_run(run, tmp_path / "out", genspec.__version__)
    assert not (tmp_path / "out").exists()
    rc, _, err = main("export", runs("vae"), "--format", "python")
    assert rc == 1 and "--format python writes a folder: give it with --out DIR" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc, _, err = main("export", runs("vae"), "--format", "python", "--out", tmp_path / "busy")
    assert rc == 1 and "holds files that are not an eject's (notes.txt)" in err
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
