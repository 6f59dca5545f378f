"""Bad input and broken files end in a `genspec:` message and a non-zero status, never a
traceback, and what a run already wrote stays as it was."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from genspec.errors import SpecError
from genspec.graph.pipeline import load_spec
from spec_helpers import QUICKSTART, cli_in_process

TINY = ["train.device=cpu", "data.split.train=64", "data.split.test=32", "train.batch_size=16", "train.max_steps=2",
        "evaluate.grids=[]"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run(out: Path, *overrides, extra=()) -> tuple[int, str, str]:
    return cli_in_process("run", QUICKSTART, "--out", out, "--no-progress", *extra, *sets([*TINY, *overrides]))


def problems(*overrides) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, list(overrides))
    return [str(p) for p in exc.value.problems]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    rc, _, err = run(out, "train.epochs=1")
    assert rc == 0, err
    return out


def copy_run(source: Path, to: Path) -> Path:
    to.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


# ---------------------------------------------------------------- values torch would refuse later

@pytest.mark.parametrize("overrides, message", [
    (["objectives.vae.optimizer=adam(-1e-3)"], "objectives.vae.optimizer: the learning rate must be positive, got -0.001"),
    (["objectives.vae.optimizer=adam(0)"], "objectives.vae.optimizer: the learning rate must be positive, got 0"),
    (["objectives.vae.optimizer=adam(lr, betas=[0.5, 1.5])"], "objectives.vae.optimizer: betas must each be in [0, 1), got [0.5, 1.5]"),
    (["objectives.vae.optimizer=sgd(lr, momentum=-1)"], "objectives.vae.optimizer: momentum must be in [0, 1), got -1"),
    (["objectives.vae.optimizer=adam(lr, eps=-1e-8)"], "objectives.vae.optimizer: eps must not be negative, got -1e-08"),
    (["networks.enc.init=normal(0, -0.02)"], "networks.enc.init: normal(mean, std): std must be positive, got -0.02"),
    (["losses.rec=bce(noisy(x_rec, 1.5), x)"], "losses.rec: noisy: the amount must be in [0, 1], got 1.5"),
    (["losses.rec=bce(x_rec, x)", "data.range=[-1, 1]"],
     "losses.rec: bce: the target x lies in data.range [-1, 1], and bce needs targets in [0, 1]"),
    (["losses.rec=bce(x_rec, 2)"], "losses.rec: bce: the target 2 is outside [0, 1]"),
    (["networks.dec.layers[2]=fc 64, tanh", "losses.rec=bce(x_rec, x)"],
     "losses.rec: bce: argument 1 comes from network dec, whose output ends in tanh, not a sigmoid"),
    (["networks.dec.layers[2]=fc 64", "losses.rec=bce(x_rec, x)"],
     "losses.rec: bce: argument 1 comes from network dec, whose output ends in no activation, not a sigmoid"),
    # expressions: interval arithmetic over the network's sigmoid, the data range, numbers and params
    (["losses.rec=bce(2 * x_rec, x)"], "losses.rec: bce: argument 1 takes values in [0, 2], and bce needs probabilities"),
    (["losses.rec=bce(x_rec - beta / 2, x)"], "losses.rec: bce: argument 1 takes values in [-0.5, 0.5]"),
    (["losses.rec=bce(x_rec, 2 * x)"], "losses.rec: bce: the target takes values in [0, 2], and bce needs targets"),
    (["losses.rec=bce(x_rec, x / 2 + 0.6)"], "losses.rec: bce: the target takes values in [0.6, 1.1]"),
    (["graph.x_rec=dec(z) * 3", "losses.rec=bce(x_rec, x)"], "losses.rec: bce: argument 1 takes values in [0, 3]"),
])
def test_values_out_of_range_are_spec_errors(overrides, message):
    found = problems(*overrides)
    assert len(found) == 1 and message in found[0], found
    assert found[0].startswith("--set ")  # located at the override that set it


def test_bce_through_range_keeping_rows_and_noise_is_accepted():
    # dec ends "fc 64, sigmoid", then reshape: the probabilities survive the reshape and the noise
    load_spec(QUICKSTART, ["losses.rec=bce(noisy(x_rec, 0.1), x)", "objectives.vae.optimizer=adam(lr, betas=[0, 0.9])"])


@pytest.mark.parametrize("loss", ["bce(0.5 * x_rec + 0.25, 1 - x)", "bce(abs(x_rec) * beta, x / beta)",
                                  "bce(x_rec, x.detach())", "bce(x_rec, x_rec / (1 + beta))"])
def test_bce_of_expressions_that_stay_in_the_unit_interval_is_accepted(loss):
    load_spec(QUICKSTART, [f"losses.rec={loss}"])


def test_interval_arithmetic_leaves_undecided_what_it_cannot_bound():
    from genspec.graph.dependencies import UNBOUNDED, _interval

    assert _interval("*", (0.0, 1.0), (-2.0, 3.0)) == (-2.0, 3.0)
    assert _interval("/", (1.0, 2.0), (-1.0, 1.0)) is None  # the divisor can be 0
    assert _interval("*", (0.0, 0.0), UNBOUNDED) is None  # 0 times infinity
    assert _interval("-", (0.0, 1.0), UNBOUNDED) == UNBOUNDED
    assert _interval("+", None, (0.0, 1.0)) is None


def test_a_bce_prediction_no_check_could_bound_stops_with_a_message(tmp_path):
    # mean_of(q) has no bounds a spec decides; x_rec + 1 + |...| exceeds 1 at the first step
    rc, _, err = run(tmp_path / "run", "losses.rec=bce(x_rec + abs(mean(mean_of(q))) + 1, x)")
    assert rc == 1 and "a bce loss got a prediction outside [0, 1]" in err and "Traceback" not in err


def test_running_out_of_memory_is_a_message_that_names_the_batch_size(tmp_path, monkeypatch):
    import genspec.train.loop

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(genspec.train.loop, "fit", out_of_memory)
    rc, _, err = run(tmp_path / "run")
    assert rc == 1 and "Traceback" not in err
    assert ("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); try a smaller train.batch_size (now "
            in err) and "--resume continues from the last checkpoint" in err


def test_a_gpu_asked_for_on_a_machine_without_one(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = run(tmp_path / "run", "train.device=cuda")
    assert rc == 1 and "train.device is cuda, but torch sees no CUDA GPU here" in err and "Traceback" not in err


# ---------------------------------------------------------------- damaged files

def test_a_truncated_checkpoint_is_named_on_resume_and_sample(finished, tmp_path):
    folder = copy_run(finished, tmp_path / "damaged")
    checkpoint = folder / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    damaged = checkpoint.read_bytes()
    rc, _, err = run(folder, "train.epochs=2", extra=["--resume"])
    assert rc == 1 and f"{checkpoint} cannot be read" in err and "--overwrite" in err and "Traceback" not in err
    rc, _, err = cli_in_process("sample", folder, "--n", 4)
    assert rc == 1 and f"{checkpoint} cannot be read" in err
    assert checkpoint.read_bytes() == damaged and (folder / "metrics.json").exists()  # nothing rewritten


def test_a_history_line_cut_short_is_redone_on_resume(finished, tmp_path):
    """A kill while appending to metrics.jsonl leaves half a line: --resume drops it and goes on."""
    folder = copy_run(finished, tmp_path / "torn")
    (folder / "metrics.jsonl").write_text((folder / "metrics.jsonl").read_text() + '{"epoch": 2, "tra')
    rc, _, err = run(folder, "train.epochs=2", extra=["--resume"])
    assert rc == 0, err
    epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_history_damaged_before_its_last_line_is_an_error(finished, tmp_path):
    folder = copy_run(finished, tmp_path / "garbled")
    good = (folder / "metrics.jsonl").read_text()
    (folder / "metrics.jsonl").write_text("not json\n" + good)
    rc, _, err = run(folder, "train.epochs=2", extra=["--resume"])
    assert rc == 1 and f"{folder / 'metrics.jsonl'}:1: not a JSON record" in err and "Traceback" not in err


# ---------------------------------------------------------------- a disk that fills, a folder that is read-only

def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(finished, tmp_path, monkeypatch):
    folder = copy_run(finished, tmp_path / "full")
    before = (folder / "checkpoint.pt").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    rc, _, err = run(folder, "train.epochs=2", extra=["--resume"])
    assert rc == 1 and "Traceback" not in err
    assert f"could not write {folder / 'checkpoint.pt'}: No space left on device (the previous one is kept)" in err
    assert (folder / "checkpoint.pt").read_bytes() == before
    assert not list(folder.glob("*.tmp"))


def test_a_folder_that_cannot_be_written_is_a_message(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    rc, _, err = run(tmp_path / "readonly" / "run")
    assert rc == 1 and "Permission denied" in err and "readonly" in err and "Traceback" not in err


def test_bce_bounds_read_a_states_clamped_range(tmp_path):
    from spec_helpers import TINY_BEGAN

    path = tmp_path / "tiny_began.yaml"
    path.write_text(TINY_BEGAN)
    gen = ["networks.gen.layers=[fc 4x4x8, upsample 2, conv 1 3x3, sigmoid]"]
    load_spec(path, [*gen, "losses.g_loss=bce(x_fake * k, 1)"])  # k stays in [0, 1]
    with pytest.raises(SpecError, match=r"bce: argument 1 takes values in \[0, 2\]"):
        load_spec(path, [*gen, "losses.g_loss=bce(x_fake * (k + 1), 1)"])
