"""Every shipped spec (specs/**/*.yaml): validates, graphs, compiles with the inferred shapes, and
runs end to end when shrunk to a couple of steps. A sweep (specs/encoderless/*_study.yaml) is
checked run by run: every expanded run validates and compiles, and a shrunk study (`--only` two
runs, one repeat, one epoch) runs end to end.

MNIST specs read the data from $GENSPEC_DATA (the folder holding MNIST/raw) and are skipped,
with the reason, when it is not set or the files are absent. Image-folder specs get a small
folder of generated PNGs. SVHN is expected to be absent unless its files are in $GENSPEC_DATA:
its study must then stop with exit 1 and a message naming the files, without a traceback.

The runs use the CPU. GENSPEC_TEST_DEVICE=cuda runs the same tiny end-to-end runs on a GPU (the
check of the CUDA path on every shipped spec: bf16 autocast, channels-last, fused optimisers), with
two seeds per study configuration so that the studies train as stacked models, as they do on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import genspec
from genspec.graph import dependencies as spec_graph
from genspec.errors import RunError
from genspec.compiler.layers import Gaussian
from genspec.graph.pipeline import load_runs
from genspec.compiler.priors import build_prior
from genspec.lang.resolve import is_fragment, resolve
from genspec.lang.sweep import factors, is_sweep
from spec_helpers import TINY_DIGITS_CLASSIFIER, cli_in_process as run_cli

ROOT = Path(__file__).resolve().parent.parent
ALL_YAML = sorted((ROOT / "specs").rglob("*.yaml"))
# files under a `_` folder are fragments (a reading that specs mix in through a list `extends`)
FRAGMENTS = [p for p in ALL_YAML if is_fragment(p, ROOT / "specs")]
SPECS = [p for p in ALL_YAML if p not in FRAGMENTS]
IDS = [p.relative_to(ROOT / "specs").with_suffix("").as_posix() for p in SPECS]
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
SAMPLE_METRICS = ("is", "fid", "kid", "prc")
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TEST_DEVICE = os.environ.get("GENSPEC_TEST_DEVICE", "cpu")
# one seed on the CPU (fast); two on CUDA, where a study stacks a configuration's seeds by default
STUDY_REPEATS = 2 if TEST_DEVICE.startswith("cuda") else 1
# two steps on the CPU; on CUDA enough for each phase of a two-phase cycle to warm up, be captured
# as a CUDA graph and replayed (train.cuda_graphs, genspec/compiler/cuda_graphs.py)
TINY_STEPS = 8 if TEST_DEVICE.startswith("cuda") else 2
TINY_TRAIN = 16 * TINY_STEPS + 32  # examples: the steps' batches of 16, and more




def test_specs_are_shipped():
    assert ROOT / "specs" / "quickstart.yaml" in SPECS
    assert {"encoderless/mnist_base", "encoderless/mnist_study", "encoderless/svhn_study"} <= set(IDS)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[p.name for p in FRAGMENTS])
def test_every_fragment_is_mixed_into_a_shipped_spec(fragment):
    """A fragment no spec lists in its `extends` would never be checked by the tests below."""
    users = []
    for spec in SPECS:
        bases = yaml.safe_load(spec.read_text()).get("extends") or []
        bases = [bases] if isinstance(bases, str) else bases
        users += [spec for base in bases if (spec.parent / base).resolve() == fragment.resolve()]
    assert users, f"{fragment} is in no shipped spec's extends"


def sweep_spec(path) -> bool:
    return is_sweep(resolve(path))


@pytest.mark.parametrize("path", SPECS, ids=IDS)
def test_spec_validates_graphs_and_compiles(path):
    runs = load_runs(path)  # (run, spec) pairs: one for a plain spec, every expanded run of a sweep
    sweep = sweep_spec(path)
    rc, out, err = run_cli("validate", path)
    assert rc == 0, err
    assert out.startswith(f"{path}: ok (")
    if sweep:
        assert out.startswith(f"{path}: ok ({runs[0][1].name}: {len(runs)} configurations x ")
        assert len(runs) == math.prod(len(levels) for levels in factors(resolve(path)).values())
    rc, out, err = run_cli("show", path, "--json")
    assert rc == 0, err
    shown = json.loads(out)
    shown = shown["runs"] if sweep else {"": shown}
    assert list(shown) == [run.id for run, _ in runs]
    if not sweep:
        rc, out, err = run_cli("graph", path, "--format", "json")
        assert rc == 0, err
        assert {n["id"] for n in json.loads(out)["nodes"]} == {n["id"] for n in spec_graph.to_json(runs[0][1].graph_nx)["nodes"]}
    for run, spec in runs:
        check_compiles(spec, shown[run.id]["networks"], run.id or spec.name)


def check_compiles(spec, shown: dict, label: str) -> None:
    nodes = {n["id"] for n in spec_graph.to_json(spec.graph_nx)["nodes"]}
    assert {f"net:{n}" for n in spec.networks} | {f"objective:{o}" for o in spec.objectives} <= nodes, label
    torch.manual_seed(0)
    nets = genspec.build(spec)
    assert set(nets) == set(spec.networks)
    for name, module in nets.items():
        info = spec.networks[name].info
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        assert (trainable, frozen) == (info.trainable, info.frozen) == (shown[name]["trainable"], shown[name]["frozen"]), (label, name)
        module.eval()
        conditions = [torch.randn(2, *shape) for shape, _ in spec.networks[name].conditions.values()]
        with torch.no_grad():
            out = module(torch.randn(2, *spec.networks[name].input), *conditions)
        if info.kind == "dist":
            assert isinstance(out, Gaussian) and tuple(out.mean.shape) == (2, *info.output), (label, name)
        else:
            assert torch.is_tensor(out) and tuple(out.shape) == (2, *info.output), (label, name)
            assert torch.isfinite(out).all()
    for name, latent in spec.latents.items():
        with torch.no_grad():
            z = build_prior(latent).sample(2, "cpu")
        assert tuple(z.shape) == (2, *latent.shape), (label, name)


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


def svhn_root(tmp_path: Path) -> Path:
    return Path(os.environ.get("GENSPEC_DATA") or tmp_path / "no-data")


def svhn_present(tmp_path: Path) -> bool:
    return all((svhn_root(tmp_path) / f).exists() for f in SVHN_FILES)


def tiny_overrides(spec, tmp_path: Path, depth: int = 0, classifier: Path | None = None) -> list[str]:
    """--set values that shrink a spec to two training steps on a few images. `classifier`: a
    finished classifier run to measure sample metrics with where Inception weights are absent."""
    sets = [f"train.device={TEST_DEVICE}", "train.epochs=1", f"train.max_steps={TINY_STEPS}", "train.batch_size=16",
            "evaluate.grid_size=2", "evaluate.interpolation_steps=3", "evaluate.batch_size=32"]
    dataset = spec.data["dataset"]
    has_val = "val" in spec.data.get("split", {})
    if dataset == "digits":
        sets += [f"data.split.train={TINY_TRAIN}", "data.split.test=32"]
    elif dataset in MNIST_FOLDERS:
        sets += [f"data.root={mnist_root(dataset)}", "data.download=false", f"data.split.train={TINY_TRAIN}", "data.split.test=32"]
    elif dataset == "svhn":
        sets += [f"data.root={svhn_root(tmp_path)}", "data.download=false", f"data.split.train={TINY_TRAIN}", "data.split.test=32"]
    else:  # image folders, and CelebA (absent here) as an image folder of the same size, streamed as
        # full-size CelebA is by default (train.loader auto): the DataLoader path runs for every such spec
        root = make_image_folder(tmp_path / "images", spec.data.get("channels", 3), n=TINY_TRAIN + 8)
        sets += [f"data.root={root}", f"data.split.train={TINY_TRAIN}", "data.split.test=8", "data.dataset=image_folder",
                 "train.loader=stream", "train.workers=1"]
    if spec.train.get("balance"):
        sets.append("train.balance.samples=64")
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
        from genspec.measure.fidelity import inception_weights

        try:
            inception_weights(spec.evaluate)
        except RunError as exc:
            if classifier is None:
                pytest.skip(f"{spec.name}: sample metrics need local Inception weights: {exc}")
            sets.append(f"evaluate.extractor.classifier={classifier}")
    elif asked:
        # the extractor is the classifier of another run: train that spec tiny first
        name = Path(extractor["classifier"]).name
        source = [p for p in SPECS if not sweep_spec(p) and genspec.load(p).name == name]
        if not source or depth > 0:
            pytest.skip(f"{spec.name}: its extractor run {extractor['classifier']} has no spec in specs/")
        classifier = genspec.load(source[0])
        folder = tmp_path / f"extractor-{name}"
        rc, _, err = run_cli("run", source[0], "--out", folder, "--no-progress",
                             *[a for o in tiny_overrides(classifier, tmp_path, depth + 1) for a in ("--set", o)])
        assert rc == 0, err
        sets.append(f"evaluate.extractor.classifier={folder}")
    return sets




@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory) -> Path:
    """A finished tiny classifier run on the 8x8 digits: a feature extractor that needs no download."""
    root = tmp_path_factory.mktemp("digits-classifier")
    (root / "spec.yaml").write_text(TINY_DIGITS_CLASSIFIER)
    rc, _, err = run_cli("run", root / "spec.yaml", "--out", root / "run", "--no-progress")
    assert rc == 0, err
    return root / "run"


# BEGAN's 64x64 tables (20M weights, 128-channel convolutions at full resolution) take minutes for
# two steps on a 2-core CPU: `make test-slow` runs them; tests/test_conditional_and_equilibrium.py
# runs the same spec with small tables in the default suite.
HEAVY = ("began",)
END_TO_END = [pytest.param(p, marks=pytest.mark.slow) if i.startswith(HEAVY) else p for p, i in zip(SPECS, IDS)]


@pytest.mark.parametrize("path", END_TO_END, ids=IDS)
def test_spec_runs_end_to_end_when_shrunk(path, tmp_path, request):
    if sweep_spec(path):
        shrunk_study(path, tmp_path, request)
        return
    spec = genspec.load(path)
    overrides = tiny_overrides(spec, tmp_path)
    out = tmp_path / "run"
    rc, stdout, err = run_cli("run", path, "--out", out, "--no-progress", *[a for o in overrides for a in ("--set", o)])
    assert rc == 0, err
    assert f"{spec.name}: done" in stdout
    assert "cannot be captured as a CUDA graph" not in err
    check_run_folder(out, genspec.load(path, overrides))
    shutil.rmtree(tmp_path)  # some shipped networks are large: do not keep their checkpoints around


def check_run_folder(out: Path, shrunk) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["device"].split(":")[0] == TEST_DEVICE.split(":")[0]
    assert set(metrics["test"]) == set(shrunk.evaluate.get("losses", list(shrunk.losses)))
    assert all(math.isfinite(v) for v in metrics["test"].values()), metrics["test"]
    priors = {f"prior:{name}": sum(p.numel() for p in build_prior(latent).parameters()) for name, latent in shrunk.latents.items()}
    assert metrics["params"] == {**{n: {"trainable": net.info.trainable, "frozen": net.info.frozen}
                                    for n, net in shrunk.networks.items()},
                                 **{k: {"trainable": v, "frozen": 0} for k, v in priors.items() if v}}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    for kind, file in metrics["grids"].items():
        assert (out / file).is_file(), kind
    assert (out / "report.md").is_file() and (out / "spec.resolved.yaml").is_file()
    if "accuracy" in shrunk.evaluate:
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
    if "fid" in shrunk.evaluate:
        assert "frechet_inception_distance" in metrics["fidelity"], metrics.get("fidelity")
    for key, value in metrics.get("real", {}).items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    run = genspec.load_run(out)
    assert run.epoch == 1 and set(run.networks) == set(shrunk.networks)


def shrink_levels(path) -> list[str]:
    """--only values that keep two runs of a sweep: the last level of every factor, and the
    first level of the last factor too (for the thesis's studies: an L and an RKS encoder)."""
    levels = factors(resolve(path))
    names = list(levels)
    return [f"{f}={levels[f][-1]}" for f in names] + [f"{names[-1]}={levels[names[-1]][0]}"]


def shrunk_study(path, tmp_path: Path, request) -> None:
    only = shrink_levels(path)
    runs = load_runs(path, only=only)
    assert len(runs) == 2
    spec = runs[0][1]
    svhn = spec.data["dataset"] == "svhn"
    classifier = request.getfixturevalue("digits_classifier") if svhn else None
    overrides = tiny_overrides(spec, tmp_path, classifier=classifier) + [f"repeats={STUDY_REPEATS}"]
    out = tmp_path / "study"
    args = ["run", path, "--out", out, "--no-progress", *[a for o in only for a in ("--only", o)],
            *[a for o in overrides for a in ("--set", o)]]
    rc, stdout, err = run_cli(*args)
    if svhn and not svhn_present(tmp_path):
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("genspec: svhn not found under ") and all(f in last for f in SVHN_FILES), err
        assert "Traceback" not in err and "Traceback" not in stdout
        assert not out.exists() or not list(out.rglob("metrics.json"))
        return
    assert rc == 0, err
    assert "cannot be captured as a CUDA graph" not in err
    total = len(runs) * STUDY_REPEATS
    assert f"study: {total} run(s) trained, 0 skipped" in err
    for run, shrunk in load_runs(path, overrides, only):
        for seed in range(shrunk.train["seed"], shrunk.train["seed"] + STUDY_REPEATS):
            check_run_folder(out / run.id / f"seed{seed}", shrunk)  # what it checks does not depend on the seed
    assert f"{total} of {total} runs finished" in (out / "study.md").read_text()
    shutil.rmtree(tmp_path)
