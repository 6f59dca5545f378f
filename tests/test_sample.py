"""`genspec sample RUN_DIR`: fresh sample and interpolation grids from a finished run, no retraining.

One tiny quick-start run (1 epoch, 2 steps) serves every test; grids are saved with padding 2,
so a grid of C columns of 8x8 images is C * (8 + 2) + 2 pixels wide.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genspec
from genspec.measure.sampling import sample_images, to_unit
from spec_helpers import cli_in_process as main, genspec_subprocess

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "specs" / "quickstart.yaml"
STEPS = 5  # evaluate.interpolation_steps of the run (the default is 8)
RUN_SETS = ["train.device=cpu", "train.epochs=1", "train.max_steps=2", "train.batch_size=16", "data.split.train=64",
            "data.split.test=32", "evaluate.grids=[]", f"evaluate.interpolation_steps={STEPS}"]




def genspec_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return genspec_subprocess(*args, timeout=timeout)


def side(cells: int, image: int = 8, padding: int = 2) -> int:
    return cells * (image + padding) + padding


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "quick"
    rc, stdout, stderr = main("run", QUICKSTART, "--out", out, "--no-progress",
                              *[a for s in RUN_SETS for a in ("--set", s)])
    assert rc == 0, stderr
    return out


def test_sample_grid_through_the_command_line(run_dir, tmp_path):
    target = tmp_path / "f.png"
    result = genspec_cli("sample", run_dir, "--n", 16, "--out", target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 16 images from dec(z) to {target}"
    image = Image.open(target)
    assert image.format == "PNG"
    assert image.size == (side(4), side(4)) == (42, 42)  # a 4x4 grid of 8x8 images
    grid = pixels(target)
    # the padding lines are the grey pad value; the image cells are not all grey
    assert set(np.unique(grid[0:2])) <= {127, 128}
    assert set(np.unique(grid[:, 10:12])) <= {127, 128}
    assert len(np.unique(grid[2:10, 2:10])) > 1


def test_sample_grid_is_the_decoder_applied_to_seeded_prior_draws(run_dir, tmp_path):
    """The grid holds dec(z) for z drawn from the prior after torch.manual_seed(seed): no retraining, no data."""
    from torchvision.utils import save_image

    target = tmp_path / "cli.png"
    rc, _, stderr = main("sample", run_dir, "--n", 9, "--out", target, "--seed", 3)
    assert rc == 0, stderr
    run = genspec.load_run(run_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        images = sample_images(run.networks["dec"], run.priors["z"], 9, "cpu")
    expected = tmp_path / "expected.png"
    save_image(to_unit(images, run.spec), expected, nrow=3, padding=2, pad_value=0.5)
    assert Image.open(target).size == (side(3), side(3))
    assert np.array_equal(pixels(target), pixels(expected))


def test_non_square_count_fills_rows_of_ceil_sqrt(run_dir, tmp_path):
    target = tmp_path / "ten.png"
    rc, stdout, _ = main("sample", run_dir, "--n", 10, "--out", target)
    assert rc == 0
    assert "wrote 10 images" in stdout
    assert Image.open(target).size == (side(4), side(3))  # 4 columns, 3 rows


def test_interpolation_grid_has_a_column_per_step(run_dir, tmp_path):
    target = tmp_path / "interp.png"
    rc, stdout, stderr = main("sample", run_dir, "--n", 16, "--interpolate", "--out", target)
    assert rc == 0, stderr
    rows = -(-16 // STEPS)  # 16 images in rows of 5: four rows
    assert f"wrote {rows * STEPS} images" in stdout
    assert Image.open(target).size == (side(STEPS), side(rows))
    grid = pixels(target).astype(int)
    # each row runs from one decoded draw to another: its two end cells differ
    first = grid[2:10, 2:10]
    last = grid[2:10, side(STEPS) - 10:side(STEPS) - 2]
    assert not np.array_equal(first, last)
    # fewer than a row's worth still gives one row
    small = tmp_path / "one_row.png"
    rc, _, _ = main("sample", run_dir, "--n", 2, "--interpolate", "--out", small)
    assert rc == 0
    assert Image.open(small).size == (side(STEPS), side(1))
    # a row and a bit gives two: at least the images asked for
    more = tmp_path / "two_rows.png"
    rc, stdout, _ = main("sample", run_dir, "--n", STEPS + 2, "--interpolate", "--out", more)
    assert rc == 0 and f"wrote {2 * STEPS} images" in stdout
    assert Image.open(more).size == (side(STEPS), side(2))


def test_same_seed_same_file_other_seed_other_file(run_dir, tmp_path):
    files = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        files[name] = tmp_path / f"{name}.png"
        rc, _, stderr = main("sample", run_dir, "--n", 16, "--seed", seed, "--out", files[name])
        assert rc == 0, stderr
    assert files["a"].read_bytes() == files["b"].read_bytes()
    assert not np.array_equal(pixels(files["a"]), pixels(files["c"]))
    interp = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        interp[name] = tmp_path / f"i{name}.png"
        assert main("sample", run_dir, "--interpolate", "--seed", seed, "--out", interp[name])[0] == 0
    assert interp["a"].read_bytes() == interp["b"].read_bytes()
    assert interp["a"].read_bytes() != interp["c"].read_bytes()


def test_default_output_lands_in_the_run_folder(run_dir):
    for name in ("samples_new.png", "interpolations_new.png"):
        (run_dir / name).unlink(missing_ok=True)
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    rc, stdout, _ = main("sample", run_dir, "--n", 4)
    assert rc == 0
    assert Image.open(run_dir / "samples_new.png").size == (side(2), side(2))
    rc, stdout, _ = main("sample", run_dir, "--interpolate", "--n", 16)
    assert rc == 0
    assert Image.open(run_dir / "interpolations_new.png").size == (side(STEPS), side(-(-16 // STEPS)))  # rounded up to whole rows
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint  # sampling never touches the run


def test_folder_that_is_not_a_run_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, stdout, stderr = main("sample", tmp_path / "empty", "--n", 4, "--out", tmp_path / "x.png")
    assert rc == 1
    assert stderr.strip() == f"genspec: {tmp_path / 'empty'} has no checkpoint.pt: not a finished genspec run"
    assert stdout == ""
    assert not (tmp_path / "x.png").exists()
    rc, _, stderr = main("sample", tmp_path / "nowhere", "--out", tmp_path / "y.png")
    assert rc == 1 and "not a finished genspec run" in stderr


def test_run_without_a_generator_exits_1(tmp_path):
    spec = tmp_path / "clf.yaml"
    spec.write_text("""\
genspec: 1
name: tiny_classifier
data: {dataset: digits, labels: true, split: {train: 64, test: 32}}
networks:
  clf:
    input: x
    layers: [flatten, "fc 10, log_softmax"]
graph: {logp: clf(x)}
losses: {nll: "nll(logp, y)"}
objectives: {clf: {minimize: nll, optimizer: adam(1e-3)}}
train: {epochs: 1, batch_size: 32, device: cpu, max_steps: 1}
evaluate: {grids: {}}
""")
    out = tmp_path / "clf"
    rc, _, stderr = main("run", spec, "--out", out, "--no-progress")
    assert rc == 0, stderr
    rc, _, stderr = main("sample", out, "--out", tmp_path / "z.png")
    assert rc == 1
    assert "no network of this run maps latent draws alone to the data shape" in stderr
    assert not (tmp_path / "z.png").exists()


def test_a_decoder_conditioned_on_the_data_labels_is_explained(tmp_path):
    """A conditional VAE's decoder reads the test labels (grids: {samples: TENSOR}): `sample`
    cannot draw from it without data, and says where the run's samples are instead."""
    spec = tmp_path / "cvae.yaml"
    spec.write_text("""\
genspec: 1
name: tiny_cvae
data: {dataset: digits, labels: true, split: {train: 64, test: 32}}
latent: {z: {shape: [2]}}
networks:
  enc: {input: x, layers: [flatten, "fc 16, relu", gaussian 2]}
  dec: {input: z, condition: {label: y}, layers: [concat label, "fc 64, sigmoid", reshape 1 8 8]}
graph:
  q: enc(x)
  x_rec: dec(rsample(q), onehot(y))
  x_gen: dec(sample(z), onehot(y))
losses: {rec: "sqerr(x_rec, x)", kl: "kl(q, z)", nelbo: rec + kl}
objectives: {vae: {networks: [enc, dec], minimize: nelbo, optimizer: adam(1e-3)}}
train: {epochs: 1, batch_size: 32, device: cpu, max_steps: 1}
evaluate: {grids: {samples: x_gen}, grid_size: 2}
""")
    out = tmp_path / "cvae"
    rc, _, stderr = main("run", spec, "--out", out, "--no-progress")
    assert rc == 0, stderr
    assert (out / "samples.png").exists()
    rc, _, stderr = main("sample", out, "--out", tmp_path / "z.png")
    assert rc == 1 and "its sample grid is the graph tensor 'x_gen'" in stderr and "samples.png" in stderr
    assert not (tmp_path / "z.png").exists()


@pytest.mark.parametrize("n", ["0", "-3"])
def test_non_positive_count_is_a_clear_error(run_dir, tmp_path, n):
    # in-process: an exception escaping cli.main is the traceback a user would see
    rc, stdout, stderr = main("sample", run_dir, "--n", n, "--out", tmp_path / "bad.png")
    assert rc == 1 and stdout == ""
    assert stderr == f"genspec: --n must be a positive number of images, got {n}\n"
    assert not (tmp_path / "bad.png").exists()


@pytest.fixture(scope="module")
def cgan_run(tmp_path_factory):
    from spec_helpers import TINY_CONDITIONAL_GAN

    folder = tmp_path_factory.mktemp("cgan")
    (folder / "cgan.yaml").write_text(TINY_CONDITIONAL_GAN)
    rc, _, err = main("run", folder / "cgan.yaml", "--out", folder / "run", "--no-progress")
    assert rc == 0, err
    return folder / "run"


def test_label_draws_a_conditional_generators_chosen_class(cgan_run, tmp_path):
    """`--label 7`: the generator gets onehot(7) for every image, with the seeded latent draws."""
    from torchvision.utils import save_image

    rc, _, err = main("sample", cgan_run, "--n", 16, "--label", 7, "--out", tmp_path / "sevens.png")
    assert rc == 0, err
    run = genspec.load_run(cgan_run)
    torch.manual_seed(0)
    with torch.no_grad():
        z = run.priors["z"].sample(16, "cpu")
        images = run.networks["gen"](z, torch.nn.functional.one_hot(torch.full((16,), 7), 10).float())
    save_image(to_unit(images, run.spec), tmp_path / "by_hand.png", nrow=4, padding=2, pad_value=0.5)
    assert np.array_equal(pixels(tmp_path / "sevens.png"), pixels(tmp_path / "by_hand.png"))
    main("sample", cgan_run, "--n", 16, "--label", 2, "--out", tmp_path / "twos.png")
    assert not np.array_equal(pixels(tmp_path / "sevens.png"), pixels(tmp_path / "twos.png"))


def test_label_mistakes_are_one_line_errors(cgan_run, run_dir, tmp_path):
    rc, _, err = main("sample", cgan_run, "--label", 10, "--out", tmp_path / "x.png")
    assert rc == 1 and "--label 10: the condition 'c' has classes 0 to 9" in err and "Traceback" not in err
    rc, _, err = main("sample", run_dir, "--label", 3, "--out", tmp_path / "y.png")
    assert rc == 1 and "--label needs a generator with one categorical condition" in err
