"""The Python API: genspec.load, genspec.build, genspec.load_run (and that the torch-free half
stays torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import genspec
from genspec.compiler.layers import Gaussian, TableNet
from genspec.lang.spec import Spec
from spec_helpers import cli_in_process as run_cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
TINY = ["train.device=cpu", "data.split.train=64", "data.split.test=32", "train.batch_size=16", "train.max_steps=2",
        "train.epochs=2", "evaluate.grids=[]"]




def test_load_returns_the_resolved_spec():
    spec = genspec.load(QUICKSTART)
    assert isinstance(spec, Spec)
    assert spec.name == "quickstart" and spec.file == str(QUICKSTART)
    assert list(spec.networks) == ["enc", "dec"]
    assert spec.data_shape == (1, 8, 8) and spec.latents["z"].shape == (8,)
    assert spec.train["epochs"] == 100 and spec.params["lr"] == 0.001
    assert spec.graph_nx is not None and "net:enc" in spec.graph_nx and "objective:vae" in spec.graph_nx


def test_load_applies_overrides():
    spec = genspec.load(QUICKSTART, ["train.epochs=3", "params.beta=0.5", "latent.z.shape=[4]",
                                     "networks.enc.layers[3]=gaussian 4"])
    assert spec.train["epochs"] == 3 and spec.params["beta"] == 0.5
    assert spec.networks["dec"].input == (4,) and spec.networks["enc"].info.output == (4,)
    assert spec.networks["enc"].info.rows[3].params == 64 * 8 + 8


def test_load_raises_spec_error(tmp_path):
    with pytest.raises(genspec.SpecError, match="no such file"):
        genspec.load(tmp_path / "missing.yaml")
    with pytest.raises(genspec.SpecError, match=r"train\.epochs: 0 is out of range"):
        genspec.load(QUICKSTART, ["train.epochs=0"])


def test_build_returns_modules_by_name():
    spec = genspec.load(QUICKSTART)
    torch.manual_seed(0)
    nets = genspec.build(spec)
    assert isinstance(nets, dict) and list(nets) == ["enc", "dec"]
    for name, module in nets.items():
        assert isinstance(module, nn.Module) and isinstance(module, TableNet)
        assert all(p.device.type == "cpu" and p.requires_grad for p in module.parameters())
        assert sum(p.numel() for p in module.parameters()) == spec.networks[name].info.trainable
    z = torch.randn(3, 8)
    assert nets["dec"](z).shape == (3, 1, 8, 8)
    q = nets["enc"](torch.rand(3, 1, 8, 8))
    assert isinstance(q, Gaussian) and q.mean.shape == q.logvar.shape == (3, 8)
    # initialisation follows the torch seed
    torch.manual_seed(0)
    again = genspec.build(spec)
    for name in nets:
        for (k, a), (_, b) in zip(nets[name].state_dict().items(), again[name].state_dict().items()):
            assert torch.equal(a, b), k


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *[a for o in TINY for a in ("--set", o)])
    assert rc == 0, err
    return out


def test_load_run_networks_equal_the_checkpoint(finished):
    run = genspec.load_run(finished)
    assert isinstance(run, genspec.FinishedRun)
    assert run.epoch == 2 and run.folder == finished
    assert run.spec.name == "quickstart" and run.spec.train["epochs"] == 2
    assert run.metrics == json.loads((finished / "metrics.json").read_text())
    assert set(run.networks) == {"enc", "dec"}
    state = torch.load(finished / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]["networks"]
    for name, module in run.networks.items():
        assert not module.training
        own = module.state_dict()
        assert set(own) == {k[len(name) + 1:] for k in state if k.startswith(name + ".")}
        for key, value in own.items():
            assert torch.equal(value, state[f"{name}.{key}"]), key
    # trained: not the initial weights any more
    torch.manual_seed(0)
    fresh = genspec.build(genspec.load(finished / "spec.resolved.yaml"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh["dec"].state_dict().values(),
                                                     run.networks["dec"].state_dict().values()))
    assert "FinishedRun(" in repr(run) and "epoch=2" in repr(run)


def test_load_run_decoder_matches_manual_loading(finished):
    run = genspec.load_run(finished)
    spec = genspec.load(QUICKSTART, TINY)
    manual = genspec.build(spec)["dec"]
    state = torch.load(finished / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]["networks"]
    manual.load_state_dict({k[len("dec."):]: v for k, v in state.items() if k.startswith("dec.")})
    manual.eval()
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        got, want = run.networks["dec"](z), manual(z)
    assert got.shape == (6, 1, 8, 8)
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() <= 1  # the sigmoid output


def test_load_run_of_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(genspec.RunError, match="checkpoint.pt"):
        genspec.load_run(tmp_path)


def test_torch_free_front_half():
    # importing genspec, loading a spec and the validate / show / graph commands never import torch
    code = (
        "import contextlib, io, sys\n"
        "import genspec\n"
        "from genspec import cli\n"
        f"spec = genspec.load({str(QUICKSTART)!r})\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    codes = [cli.main(['validate', {str(QUICKSTART)!r}]), cli.main(['show', {str(QUICKSTART)!r}, '--json']),\n"
        f"             cli.main(['graph', {str(QUICKSTART)!r}, '--format', 'json'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 0, 0] False"
