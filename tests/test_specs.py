"""Every shipped spec (specs/*.yaml): validates, graphs, compiles with the inferred shapes, and
runs end to end when shrunk to a couple of steps.

MNIST specs read the data from $GENSPEC_DATA (the folder holding MNIST/raw) and are skipped,
with the reason, when it is not set or the files are absent. Image-folder specs get a small
folder of generated PNGs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import genspec
from genspec import cli
from genspec.errors import RunError
from genspec.layers import Gaussian

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
SAMPLE_METRICS = ("is", "fid", "kid", "prc")
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_specs_are_shipped():
    assert ROOT / "specs" / "quickstart.yaml" in SPECS


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_validates_graphs_and_compiles(path):
    rc, out, err = run_cli("validate", path)
    assert rc == 0, err
    assert out.startswith(f"{path}: ok (")
    rc, out, err = run_cli("graph", path, "--format", "json")
    assert rc == 0, err
    nodes = {n["id"] for n in json.loads(out)["nodes"]}
    spec = genspec.load(path)
    assert {f"net:{n}" for n in spec.networks} | {f"objective:{o}" for o in spec.objectives} <= nodes
    rc, out, err = run_cli("show", path, "--json")
    assert rc == 0, err
    shown = json.loads(out)["networks"]
    torch.manual_seed(0)
    nets = genspec.build(spec)
    assert set(nets) == set(spec.networks)
    for name, module in nets.items():
        info = spec.networks[name].info
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        assert (trainable, frozen) == (info.trainable, info.frozen) == (shown[name]["trainable"], shown[name]["frozen"]), name
        module.eval()
        with torch.no_grad():
            out = module(torch.randn(2, *spec.networks[name].input))
        if info.kind == "dist":
            assert isinstance(out, Gaussian) and tuple(out.mean.shape) == (2, *info.output), name
        else:
            assert torch.is_tensor(out) and tuple(out.shape) == (2, *info.output), name
            assert torch.isfinite(out).all()


# ---------------------------------------------------------------- tiny end-to-end runs

def mnist_root(dataset: str) -> Path:
    root = os.environ.get("GENSPEC_DATA")
    folder = MNIST_FOLDERS[dataset]
    if not root:
        pytest.skip(f"{dataset}: GENSPEC_DATA is not set; point it at the folder holding {folder}/raw")
    raw = Path(root) / folder / "raw"
    if not all((raw / f).exists() or (raw / f"{f}.gz").exists() for f in MNIST_FILES):
        pytest.skip(f"{dataset}: the files {', '.join(MNIST_FILES)} are absent under {raw}")
    return Path(root)


def make_image_folder(root: Path, channels: int, n: int = 40) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(pixels, "RGB")
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (img.convert("L") if channels == 1 else img).save(folder / f"{i:03d}.png")
    return root


def tiny_overrides(spec, tmp_path: Path, depth: int = 0) -> list[str]:
    """--set values that shrink a spec to two training steps on a few images."""
    sets = ["train.device=cpu", "train.epochs=1", "train.max_steps=2", "train.batch_size=16",
            "evaluate.grid_size=2", "evaluate.interpolation_steps=3", "evaluate.batch_size=32"]
    dataset = spec.data["dataset"]
    has_val = "val" in spec.data.get("split", {})
    if dataset == "digits":
        sets += ["data.split.train=64", "data.split.test=32"]
    elif dataset in MNIST_FOLDERS:
        sets += [f"data.root={mnist_root(dataset)}", "data.download=false", "data.split.train=64", "data.split.test=32"]
    else:
        root = make_image_folder(tmp_path / "images", spec.data.get("channels", 3))
        sets += [f"data.root={root}", "data.split.train=24", "data.split.test=8"]
    if has_val:
        sets.append("data.split.val=0")
    asked = [m for m in SAMPLE_METRICS if m in spec.evaluate]
    for metric in asked:
        sets.append(f"evaluate.{metric}.samples=32")
        if metric == "kid":
            sets.append("evaluate.kid.subset_size=16")
        if metric == "is":
            sets.append("evaluate.is.splits=2")
    if "reference" in spec.evaluate:
        sets.append("evaluate.reference.size=32")
    extractor = spec.evaluate.get("extractor", "inception")
    if asked and extractor == "inception":
        from genspec.fidelity import inception_weights

        try:
            inception_weights(spec.evaluate)
        except RunError as exc:
            pytest.skip(f"{spec.name}: sample metrics need local Inception weights: {exc}")
    elif asked:
        # the extractor is the classifier of another run: train that spec tiny first
        name = Path(extractor["classifier"]).name
        source = [p for p in SPECS if genspec.load(p).name == name]
        if not source or depth > 0:
            pytest.skip(f"{spec.name}: its extractor run {extractor['classifier']} has no spec in specs/")
        classifier = genspec.load(source[0])
        folder = tmp_path / f"extractor-{name}"
        rc, _, err = run_cli("run", source[0], "--out", folder, "--no-progress",
                             *[a for o in tiny_overrides(classifier, tmp_path, depth + 1) for a in ("--set", o)])
        assert rc == 0, err
        sets.append(f"evaluate.extractor.classifier={folder}")
    return sets


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_runs_end_to_end_when_shrunk(path, tmp_path):
    spec = genspec.load(path)
    overrides = tiny_overrides(spec, tmp_path)
    out = tmp_path / "run"
    rc, stdout, err = run_cli("run", path, "--out", out, "--no-progress", *[a for o in overrides for a in ("--set", o)])
    assert rc == 0, err
    assert f"{spec.name}: done" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    shrunk = genspec.load(path, overrides)
    assert metrics["epochs"] == 1 and metrics["device"] == "cpu"
    assert set(metrics["test"]) == set(shrunk.evaluate.get("losses", list(shrunk.losses)))
    assert all(math.isfinite(v) for v in metrics["test"].values()), metrics["test"]
    assert metrics["params"] == {n: {"trainable": net.info.trainable, "frozen": net.info.frozen}
                                 for n, net in shrunk.networks.items()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    for kind, file in metrics["grids"].items():
        assert (out / file).is_file(), kind
    assert (out / "report.md").is_file() and (out / "spec.resolved.yaml").is_file()
    if "accuracy" in shrunk.evaluate:
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
    for key, value in metrics.get("real", {}).items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    run = genspec.load_run(out)
    assert run.epoch == 1 and set(run.networks) == set(spec.networks)
    del run
    shutil.rmtree(tmp_path)  # some shipped networks are large: do not keep their checkpoints around
