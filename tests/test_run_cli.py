"""`genspec run` end to end on a tiny quickstart: the run folder's files, the report, the image
grids, and how an existing folder is refused, replaced or kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import genspec
from genspec.compiler.model import Model
from genspec.data.datasets import load_data
from genspec.measure.evaluate import make_grids
from spec_helpers import cli_in_process as run_cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
BASE = ["train.device=cpu", "data.split.train=64", "data.split.test=32", "train.batch_size=16", "train.max_steps=2"]
# grids of 4x4 (samples, 8 reconstruction pairs) and 4 rows of 5 interpolation steps
RUN_SETS = BASE + ["train.epochs=2", "evaluate.grid_size=4", "evaluate.interpolation_steps=5"]
FAST = BASE + ["train.epochs=1", "evaluate.grids=[]"]
RUN_FILES = {"spec.resolved.yaml", "layers.md", "metrics.jsonl", "metrics.json", "samples.png", "reconstructions.png",
             "interpolations.png", "losses.png", "graph.png", "report.md", "checkpoint.pt",
             ".genspec-files",  # the manifest of the files the run wrote (what --overwrite replaces)
             "tensorboard"}  # the event files of train.tracking's default


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]




def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "quick"
    rc, stdout, stderr = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(RUN_SETS))
    assert rc == 0, stderr
    return out, stdout, stderr


def test_run_folder_has_every_file(tiny_run):
    out, stdout, stderr = tiny_run
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert not list(out.rglob("*.tmp"))
    assert re.search(r"^quickstart: done; test rec [-\d.e+]+, kl [-\d.e+]+, elbo [-\d.e+]+; report in .*/report\.md$",
                     stdout.strip()), stdout
    assert stdout.strip().endswith(f"{out}/report.md")
    # one progress line per epoch on stderr when there is no progress bar
    assert [int(m) for m in re.findall(r"quickstart epoch (\d)/2", stderr)] == [1, 2]


def test_resolved_spec_is_the_spec_with_overrides(tiny_run):
    out, _, _ = tiny_run
    resolved = yaml.safe_load((out / "spec.resolved.yaml").read_text())
    spec = genspec.load(QUICKSTART, RUN_SETS)
    assert resolved == spec.raw
    assert resolved["train"]["epochs"] == 2 and resolved["data"]["split"] == {"train": 64, "test": 32}
    again = genspec.load(out / "spec.resolved.yaml")
    assert {n: (net.info.trainable, net.info.frozen) for n, net in again.networks.items()} == \
           {n: (net.info.trainable, net.info.frozen) for n, net in spec.networks.items()}


def test_metrics_files(tiny_run):
    out, _, _ = tiny_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r["test"]) == {"rec", "kl", "elbo"}
        assert {"rec", "kl", "elbo", "objective/vae"} <= set(r["train"])
        assert r["time_s"] >= 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "quickstart" and metrics["epochs"] == 2 and metrics["seed"] == 0
    assert metrics["device"] == "cpu"
    assert set(metrics["test"]) == {"rec", "kl", "elbo"}
    # the final test losses are those of the last epoch: same network, same evaluation draws
    assert metrics["test"] == records[-1]["test"]
    assert metrics["train_last_epoch"] == records[-1]["train"]
    assert abs(metrics["test"]["elbo"] - (metrics["test"]["rec"] + metrics["test"]["kl"])) < 1e-6 * metrics["test"]["elbo"]
    assert metrics["data"] == {"dataset": "digits", "train": 64, "test": 32, "val": 0, "notes": []}
    assert metrics["grids"] == {"samples": "samples.png", "reconstructions": "reconstructions.png",
                                "interpolations": "interpolations.png"}


def test_metrics_params_equal_show_json(tiny_run):
    out, _, _ = tiny_run
    rc, stdout, _ = run_cli("show", QUICKSTART, "--json", *sets(RUN_SETS))
    assert rc == 0
    shown = json.loads(stdout)["networks"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"] == {n: {"trainable": v["trainable"], "frozen": v["frozen"]} for n, v in shown.items()}
    # and those are the sizes of the trained networks in the checkpoint
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]["networks"]
    for name, counts in metrics["params"].items():
        assert sum(v.numel() for k, v in state.items() if k.startswith(name + ".")) == counts["trainable"] + counts["frozen"]


def test_layers_md_lists_each_network(tiny_run):
    out, _, _ = tiny_run
    text = (out / "layers.md").read_text()
    spec = genspec.load(QUICKSTART, RUN_SETS)
    for name, net in spec.networks.items():
        assert f"**{name}  (input {'x'.join(map(str, net.input))}, init default)**" in text
        assert f"| total | {'x'.join(map(str, net.info.output))} | {net.info.trainable:,} | 0 |" in text
    assert "| gaussian 8 |" in text and "| reshape 1 8 8 |" in text
    total = sum(net.info.trainable for net in spec.networks.values())
    assert f"| vae | elbo | enc, dec | adam(lr=0.001) | {total:,} |" in text


def grid_cells(path: Path, cell: int, pad: int = 2) -> tuple[int, int, np.ndarray]:
    img = Image.open(path)
    img.load()
    w, h = img.size
    assert (w - pad) % (cell + pad) == 0 and (h - pad) % (cell + pad) == 0, (w, h)
    return (w - pad) // (cell + pad), (h - pad) // (cell + pad), np.asarray(img.convert("RGB"))


def cell_at(arr: np.ndarray, row: int, col: int, cell: int = 8, pad: int = 2) -> np.ndarray:
    y, x = pad + row * (cell + pad), pad + col * (cell + pad)
    return arr[y:y + cell, x:x + cell, 0].astype(np.float32) / 255.0


def test_pngs_open_with_expected_grid_sizes(tiny_run):
    out, _, _ = tiny_run
    assert grid_cells(out / "samples.png", 8)[:2] == (4, 4)
    assert grid_cells(out / "reconstructions.png", 8)[:2] == (4, 4)  # 8 (original, reconstruction) pairs
    assert grid_cells(out / "interpolations.png", 8)[:2] == (5, 4)  # 4 rows of 5 steps
    assert Image.open(out / "samples.png").size == (42, 42)
    assert Image.open(out / "interpolations.png").size == (52, 42)
    for name in ("losses.png", "graph.png"):
        with Image.open(out / name) as img:
            img.load()
            assert img.size[0] > 100 and img.size[1] > 100


def test_reconstruction_grid_alternates_originals_and_reconstructions(tiny_run):
    out, _, _ = tiny_run
    cols, rows, arr = grid_cells(out / "reconstructions.png", 8)
    spec = genspec.load(QUICKSTART, RUN_SETS)
    test = load_data(spec.data, spec.train["seed"]).test.x
    k = 0
    for r in range(rows):
        for c in range(0, cols, 2):
            np.testing.assert_allclose(cell_at(arr, r, c), test[k, 0].numpy(), atol=1.5 / 255)
            assert np.abs(cell_at(arr, r, c + 1) - test[k, 0].numpy()).max() > 2 / 255  # a reconstruction, not a copy
            k += 1
    assert k == 8


def test_reconstruction_grid_with_odd_grid_size(tmp_path):
    spec = genspec.load(QUICKSTART, BASE + ["evaluate.grid_size=3", "evaluate.grids=[reconstructions]"])
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    test = load_data(spec.data, 0).test
    make_grids(spec, model, test, tmp_path)
    cols, rows, arr = grid_cells(tmp_path / "reconstructions.png", 8)
    # an odd grid size is rounded up to an even number of columns, so pairs never wrap across rows:
    # 4 columns x 3 rows = 6 (original, reconstruction) pairs, originals in the even columns
    assert (cols, rows) == (4, 3)
    k = 0
    for r in range(rows):
        for c in range(0, cols, 2):
            np.testing.assert_allclose(cell_at(arr, r, c), test.x[k, 0].numpy(), atol=1.5 / 255)
            assert np.abs(cell_at(arr, r, c + 1) - test.x[k, 0].numpy()).max() > 2 / 255  # a reconstruction
            k += 1
    assert k == 6


def test_report_links_every_artifact(tiny_run):
    out, _, _ = tiny_run
    text = (out / "report.md").read_text()
    assert text.startswith("# quickstart\n")
    links = set(re.findall(r"\]\(([^)]+)\)", text))
    assert {"samples.png", "reconstructions.png", "interpolations.png", "losses.png", "graph.png",
            "spec.resolved.yaml", "metrics.jsonl", "metrics.json"} <= links
    for link in links:
        assert (out / link).is_file(), link
    metrics = json.loads((out / "metrics.json").read_text())
    for name, value in metrics["test"].items():
        assert f"| {name} | {value:.5g} |" in text
    assert "## Networks" in text and "**enc" in text and "**dec" in text


def test_existing_run_is_refused_and_left_byte_identical(tiny_run):
    out, _, _ = tiny_run
    before = folder_bytes(out)
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 1
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert folder_bytes(out) == before


def test_overwrite_replaces_the_run(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST + ["train.epochs=2"]))
    assert rc == 0, err
    (out / "stale.txt").write_text("left from before")
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=3"]))
    assert rc == 0, err
    assert (out / "stale.txt").read_text() == "left from before"  # not a file the run wrote: kept (issue 23)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["epochs"] == 1
    assert yaml.safe_load((out / "spec.resolved.yaml").read_text())["train"]["seed"] == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_overwrite_that_fails_before_training_keeps_the_old_run(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 0, err
    before = folder_bytes(out)
    # the data stage fails (an image folder that is not there): the old run must survive
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite",
                         *sets(FAST + ["data.dataset=image_folder", f"data.root={tmp_path / 'no_images'}",
                                       "data.image_size=8", "data.channels=1"]))
    assert rc == 1 and "does not exist: set data.root" in err
    assert folder_bytes(out) == before


def test_a_split_larger_than_the_dataset_is_a_located_spec_error(tmp_path):
    """digits has 1797 images and MNIST's training set 60000: a larger split fails in validation,
    at data.split, before any data is read."""
    rc, _, err = run_cli("validate", QUICKSTART, "--set", "data.split.train=5000")
    assert rc == 2 and "data.split: asks for 5297 images (5000 train, 0 val, 297 test) but digits has 1797" in err
    rc, _, err = run_cli("validate", QUICKSTART, "--set", "data.split={train: 1600}")  # + the default sixth as test
    assert rc == 2 and "asks for 1899 images (1600 train, 0 val, 299 test)" in err
    rc, _, err = run_cli("validate", ROOT / "specs" / "mnist_vae.yaml", "--set", "data.split={train: 55000, val: 5001}")
    assert rc == 2 and "asks for 60001 training and validation images but mnist's training set has 60000" in err
    assert run_cli("validate", ROOT / "specs" / "mnist_vae.yaml", "--set", "data.split={train: 55000, val: 5000}")[0] == 0


def test_overwrite_does_not_delete_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST))
    assert (out / "thesis.tex").read_text() == "months of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert rc == 1 and "is not empty and is not a genspec run folder; choose another --out" in err


def test_a_folder_that_is_not_a_run_is_not_called_a_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 1 and (out / "thesis.tex").read_text() == "months of work"
    assert "already holds a run" not in err and "not a genspec run folder" in err


def test_spec_error_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST + ["train.epochs=0"]))
    assert rc == 2
    assert "train.epochs" in err and "--set train.epochs=0" in err
    assert not out.exists()


def mnist_classifier_without_data(tmp_path: Path, **sections) -> Path:
    """A tiny MNIST classifier spec whose data.root holds no MNIST."""
    spec = tmp_path / "mnist_tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "genspec": 1, "name": "mnist_tiny",
        "data": {"dataset": "mnist", "labels": True, "root": str(tmp_path / "nowhere")},
        "networks": {"clf": {"input": "x", "layers": ["flatten", "fc 10, log_softmax"]}},
        "graph": {"logp": "clf(x)"},
        "losses": {"nll": "nll(logp, y)"},
        "objectives": {"clf": {"minimize": "nll", "optimizer": "adam(1e-3)"}},
        **sections,
    }))
    return spec


def test_missing_mnist_is_a_clean_run_error(tmp_path):
    spec = mnist_classifier_without_data(tmp_path)
    out = tmp_path / "run"
    rc, _, err = run_cli("run", spec, "--out", out, "--no-progress", "--set", "train.device=cpu")
    assert rc == 1
    assert err.startswith("genspec: mnist not found under ")
    assert str((tmp_path / "nowhere").resolve() / "MNIST" / "raw") in err
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    assert "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


def test_everything_a_run_misses_before_training_is_said_at_once(tmp_path):
    no_classifier = str(tmp_path / "no_classifier")  # FID's feature extractor: a run folder with no finished run
    spec = mnist_classifier_without_data(tmp_path, evaluate={"fid": {"samples": 10}, "extractor": {"classifier": no_classifier}})
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "run", "--no-progress", "--set", "train.device=cpu")
    lines = err.splitlines()
    assert rc == 1 and "Traceback" not in err and len(lines) == 2, err
    assert lines[0] == (f"genspec: evaluate.extractor: {no_classifier} holds no finished classifier run (no checkpoint.pt); "
                        "train one first, e.g. genspec run specs/mnist_classifier.yaml")
    assert lines[1].startswith("genspec: mnist not found under ")


def test_a_grid_with_nothing_to_show_is_a_spec_error_before_the_data_is_looked_for(tmp_path):
    spec = mnist_classifier_without_data(tmp_path, evaluate={"grids": ["samples"]})  # a classifier draws no samples
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "run", "--no-progress", "--set", "train.device=cpu")
    assert rc == 2 and "Traceback" not in err and "mnist not found" not in err
    assert "evaluate.grids[0]: no network turns a latent's draws into an image of the data's shape 1x28x28" in err
    assert not (tmp_path / "run").exists()


def test_sample_command_draws_from_a_finished_run(tiny_run, tmp_path):
    out, _, _ = tiny_run
    target = tmp_path / "fresh.png"
    rc, stdout, err = run_cli("sample", out, "--n", 9, "--out", target, "--seed", 1)
    assert rc == 0, err
    assert "wrote 9 images from dec(z)" in stdout
    assert grid_cells(target, 8)[:2] == (3, 3)
    # the same seed draws the same images
    again = tmp_path / "again.png"
    assert run_cli("sample", out, "--n", 9, "--out", again, "--seed", 1)[0] == 0
    assert again.read_bytes() == target.read_bytes()


def test_an_interrupted_run_says_what_it_left_and_starts_afresh_without_a_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C before the first checkpoint leaves only the layer tables and the resolved spec:
    the message says there is nothing to resume, --resume says to run it again, and a plain run
    starts afresh without --overwrite. Stopped after a checkpoint, the message says --resume."""
    import genspec.train.loop

    out = tmp_path / "run"
    real_epoch = genspec.train.loop._one_epoch

    def stop_at(epoch_to_stop):
        def one_epoch(spec, model, splits, epoch, *args, **kwargs):
            if epoch == epoch_to_stop:
                raise KeyboardInterrupt
            return real_epoch(spec, model, splits, epoch, *args, **kwargs)
        return one_epoch

    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", stop_at(1))
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 130 and "interrupted before the first checkpoint; nothing to resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["layers.md", "spec.resolved.yaml", "tensorboard"]
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--resume", *sets(FAST))
    assert rc == 1 and "run it again without --resume to start afresh" in err
    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", stop_at(2))
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(BASE + ["train.epochs=2", "evaluate.grids=[]"]))
    assert rc == 130 and "stopped before its first epoch ended" in err, err
    assert f"interrupted; {out} keeps its last checkpoint, and --resume continues from it" in err
    assert (out / "checkpoint.pt").is_file()
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 1 and "already holds a run" in err  # a checkpoint is worth keeping: --overwrite or --resume


def test_an_overwrite_that_stops_mid_training_keeps_the_old_run(tmp_path, monkeypatch):
    """--overwrite moves the old run aside until the new one has finished: Ctrl-C in the new run's
    first epoch leaves the old one, byte for byte, where the message says; the next finished run
    removes it."""
    import genspec.train.loop

    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 0, err
    before = folder_bytes(out)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", interrupted)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=3"]))
    backup = tmp_path / ".run.replaced"
    assert rc == 130 and f"the run --overwrite was replacing is kept in {backup}" in err
    assert folder_bytes(backup) == before
    with monkeypatch.context() as patch:  # stopped again: the first replaced run is the one kept
        patch.setattr(genspec.train.loop, "_one_epoch", interrupted)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=4"]))
    assert rc == 130 and folder_bytes(backup) == before
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=5"]))
    assert rc == 0, err
    assert not backup.exists() and json.loads((out / "metrics.json").read_text())["seed"] == 5


def test_overwrite_keeps_what_is_not_the_runs(tmp_path, monkeypatch):
    """A tuning (`reports/<name>/tune/`) and a study's report live in the run folder of their
    spec: --overwrite replaces the run's files only, also when the new run is stopped, and a
    folder holding only such things takes a first run without --overwrite."""
    import genspec.train.loop

    out = tmp_path / "run"
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "trials.csv").write_text("trial,beta\n0,1.0\n")
    (out / "study.md").write_text("# Study quickstart\n")
    others = folder_bytes(out)
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 0, err  # nothing of a run there yet
    first = {name: data for name, data in folder_bytes(out).items() if name not in others}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", interrupted)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=3"]))
    assert rc == 130
    backup = tmp_path / ".run.replaced"
    assert folder_bytes(backup) == first  # the old run's files, and only those
    assert {k: v for k, v in folder_bytes(out).items() if k in others} == others
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST + ["train.seed=5"]))
    assert rc == 0, err
    assert not backup.exists()
    assert {k: v for k, v in folder_bytes(out).items() if k in others} == others


def test_a_nested_folder_left_in_the_backup_comes_back(tmp_path):
    """A kill between moving the old run aside and moving the nested folders back leaves those
    in the backup: the next finished run brings them back rather than delete them with it."""
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 0, err
    backup = tmp_path / ".run.replaced"
    out.rename(backup)  # as the kill would leave it: the whole old folder aside, a new empty one
    (backup / "tune").mkdir()
    (backup / "tune" / "trials.csv").write_text("trial\n0\n")
    out.mkdir()
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--overwrite", *sets(FAST))
    assert rc == 0, err
    assert (out / "tune" / "trials.csv").read_text() == "trial\n0\n" and not backup.exists()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 1 and "is a file, not a folder" in err and "Traceback" not in err
    assert out.read_text() == "mine\n"


def test_metrics_json_comes_last_and_marks_the_run_finished(tmp_path, monkeypatch):
    """A run stopped while writing its report has no metrics.json (which a study reads as
    "finished"); --resume evaluates again and finishes it. A resume asked for more epochs drops
    the old metrics.json at once: stopped part-way, the folder does not claim to be finished."""
    import genspec.report.run_report

    out = tmp_path / "run"
    real_report = genspec.report.run_report.write_report

    def stopped_in_report(*args, **kwargs):
        real_report(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.report.run_report, "write_report", stopped_in_report)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *sets(FAST))
    assert rc == 130 and (out / "report.md").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob("*.tmp"))
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--resume", *sets(FAST))
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["test"]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", interrupted)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", "--resume",
                             *sets(FAST + ["train.epochs=2"]))
    assert rc == 130 and not (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()


def test_interrupted_with_metrics_but_no_checkpoint_says_overwrite(tmp_path, monkeypatch):
    """With train.checkpoint_every 2, a run stopped in epoch 2 has epoch 1's metrics and no
    checkpoint: the message says --overwrite, which is what a rerun then asks for."""
    import genspec.train.loop

    out = tmp_path / "run"
    real_epoch = genspec.train.loop._one_epoch

    def stop_in_second(spec, model, splits, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(spec, model, splits, epoch, *args, **kwargs)

    overrides = sets(BASE + ["train.epochs=2", "train.checkpoint_every=2", "evaluate.grids=[]"])
    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", stop_in_second)
        rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *overrides)
    assert rc == 130 and f"nothing to resume: --overwrite starts {out} afresh" in err, err
    assert (out / "metrics.jsonl").is_file() and not (out / "checkpoint.pt").exists()
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress", *overrides)
    assert rc == 1 and "--overwrite" in err


def test_the_report_says_what_each_grid_shows_and_why_a_train_cell_is_empty(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("run", QUICKSTART, "--out", out, "--no-progress",
                         *sets(BASE + ["train.epochs=1", "evaluate.grid_size=2", "losses.l1rec=l1(x_rec, x)",
                                       "evaluate.losses=[rec, kl, elbo, l1rec]"]))
    assert rc == 0, err
    report = (out / "report.md").read_text()
    l1rec = next(line for line in report.splitlines() if line.startswith("| l1rec |"))
    assert l1rec.endswith("| – |") and "–: no training phase computes this loss" in report
    assert not next(line for line in report.splitlines() if line.startswith("| elbo |")).endswith("| – |")
    assert "Test images (odd columns) each followed by its reconstruction" in report
    assert "Each row: 8 images along a straight line between two draws of the latent" in report
    assert "Images generated from draws of the prior." in report
