"""Training: phase schedules, determinism, resume, atomic checkpoints, non-finite losses, and the
data stage (splits, ranges, padding, MNIST and image folders)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import genspec
from genspec.data.datasets import load_data
from genspec.errors import RunError
from genspec.lang.validate import DATA_DEFAULTS
from spec_helpers import REPO, cli_in_process as run_cli, tiny_gan_doc

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
# quickstart shrunk to seconds: 4 batches of 16, 2 steps an epoch, no image grids
TINY = ["train.device=cpu", "data.split.train=64", "data.split.test=32", "train.batch_size=16", "train.max_steps=2",
        "evaluate.grids=[]"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]




def run_spec(spec, out, *overrides, extra=()) -> tuple[int, str, str]:
    return run_cli("run", spec, "--out", out, "--no-progress", *extra, *sets(overrides))


def history(folder: Path, drop_time: bool = True) -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if drop_time:  # wall-clock seconds are the one field allowed to differ between identical runs
        for r in records:
            r.pop("time_s")
    return records


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tensors(a, b, path="state"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------- phases

def gan_doc(phases, epochs=1, **train) -> dict:
    return tiny_gan_doc("phasegan", 0.002, phases, epochs, **train)


def optimizer_steps(folder: Path) -> dict[str, set]:
    """Adam's per-parameter step counters from the checkpoint, by objective."""
    state = checkpoint(folder)["model"]["optimizers"]
    return {name: {int(s["step"]) for s in opt["state"].values()} | ({0} if not opt["state"] else set())
            for name, opt in state.items()}


@pytest.mark.parametrize("max_steps, dis_steps, gen_steps", [(None, 8, 2), (5, 4, 1)])
def test_phase_repeat_counts_optimizer_steps(tmp_path, max_steps, dis_steps, gen_steps):
    # 160 images / 16 = 10 batches; the cycle dis, dis, dis, gen consumes one batch per entry
    train = {"max_steps": max_steps} if max_steps else {}
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc([{"update": ["dis"], "repeat": 3}, {"update": ["gen"]}], **train))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    assert optimizer_steps(tmp_path / "run") == {"dis": {dis_steps}, "gen": {gen_steps}}
    (record,) = history(tmp_path / "run")
    assert {"d_real", "d_fake", "g_adv", "objective/dis", "objective/gen"} <= set(record["train"])


def test_phase_epochs_limit_when_a_phase_runs(tmp_path):
    phases = [{"update": ["dis"], "epochs": [1, 1]}, {"update": ["gen"], "epochs": [2, 3]}]
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc(phases, epochs=3))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    assert optimizer_steps(tmp_path / "run") == {"dis": {10}, "gen": {20}}
    records = history(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]["train"]) == {"d_real", "d_fake", "objective/dis"}
    for r in records[1:]:
        assert set(r["train"]) == {"g_adv", "objective/gen"}


def test_a_phase_joins_the_cycle_in_its_first_epoch(tmp_path):
    # epoch 1 trains only the discriminator (10 steps); in epoch 2 the cycle is dis, gen (5 each)
    phases = [{"update": ["dis"]}, {"update": ["gen"], "epochs": [2, 2]}]
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc(phases, epochs=2))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    assert optimizer_steps(tmp_path / "run") == {"dis": {15}, "gen": {5}}
    records = history(tmp_path / "run")
    assert "objective/gen" not in records[0]["train"] and "objective/gen" in records[1]["train"]


def test_the_phase_cycle_runs_on_across_epochs(tmp_path):
    # two steps an epoch and a cycle of four (dis, dis, dis, gen): restarted each epoch, the
    # generator would never train; running on, epoch 2's second step is the generator's
    phases = [{"update": ["dis"], "repeat": 3}, {"update": ["gen"]}]
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc(phases, epochs=2, max_steps=2))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    assert optimizer_steps(tmp_path / "run") == {"dis": {3}, "gen": {1}}


@pytest.mark.parametrize("phases, dis_steps, gen_steps", [
    # 10 batches: 1:1 on one batch (the papers' loop) updates each network once per batch
    ([{"update": ["dis"]}, {"update": ["gen"], "batch": "same"}], 10, 10),
    # WGAN's n_critic: five critic batches, the generator on the fifth
    ([{"update": ["dis"], "repeat": 5}, {"update": ["gen"], "batch": "same"}], 10, 2),
    # G:D 5:1 with the generator's five updates on the discriminator's batch
    ([{"update": ["dis"]}, {"update": ["gen"], "repeat": 5, "batch": "same"}], 10, 50),
    # the default, a batch per phase, for comparison: half the updates each
    ([{"update": ["dis"]}, {"update": ["gen"]}], 5, 5),
])
def test_batch_same_shares_a_batch_and_metrics_count_updates(tmp_path, phases, dis_steps, gen_steps):
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc(phases, epochs=2))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    assert optimizer_steps(tmp_path / "run") == {"dis": {2 * dis_steps}, "gen": {2 * gen_steps}}
    records = history(tmp_path / "run")
    assert [r["updates"] for r in records] == [{"dis": dis_steps, "gen": gen_steps}] * 2
    assert {"objective/dis", "objective/gen"} <= set(records[0]["train"])


def test_a_shared_batch_is_the_batch_of_the_phase_before(tmp_path):
    from genspec.train.loop import _one_epoch, phase_cycle
    from genspec.compiler.model import Model
    from genspec.data.datasets import load_data

    spec = genspec.load(write_yaml(tmp_path / "gan.yaml", gan_doc([{"update": ["dis"]}, {"update": ["gen"], "batch": "same"}])))
    assert phase_cycle(spec.phases, 1) == [[0, 1]]
    splits = load_data(spec.data, spec.train["seed"])
    model = Model(spec, torch.device("cpu"))
    seen = []
    model.train_step = lambda phase, x, y=None: seen.append((phase, x)) or {}
    updates = {}
    _one_epoch(spec, model, splits, 1, None, updates=updates)
    assert [phase for phase, _ in seen] == [0, 1] * 10
    assert all(seen[i][1] is seen[i + 1][1] for i in range(0, 20, 2))  # gen runs on dis's batch
    assert not torch.equal(seen[0][1], seen[2][1])
    assert updates == {"dis": 10, "gen": 10}


def test_batch_same_on_the_first_phase_is_refused(tmp_path):
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc([{"update": ["dis"], "batch": "same"}, {"update": ["gen"]}]))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 2 and "train.phases[0].batch: the first phase has no phase before it" in err and "Traceback" not in err


@pytest.mark.parametrize("phases, epochs, message", [
    ([{"update": ["dis"]}], 1, "train.phases: no phase updates objective 'gen': its networks would never train"),
    ([{"update": ["dis"]}, {"update": ["gen"], "epochs": [2, 3]}], 1,
     "train.phases: objective 'gen' is updated only in epochs 2-3, after the last epoch (train.epochs is 1)"),
])
def test_an_objective_that_would_never_train_is_refused(tmp_path, phases, epochs, message):
    spec = write_yaml(tmp_path / "gan.yaml", gan_doc(phases, epochs=epochs))
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc != 0 and message in err and "Traceback" not in err
    assert "gan.yaml:" in err  # names the file (and the line of train.phases)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- determinism and resume

@pytest.fixture(scope="module")
def process_runs(tmp_path_factory):
    """Fresh `python -m genspec run` processes, started together (each pays torch's import once):
    two identical tiny quickstart runs, and one with a learning rate that diverges."""
    base = tmp_path_factory.mktemp("processes")
    jobs = {
        "a": TINY + ["train.epochs=2"],
        "b": TINY + ["train.epochs=2"],
        "huge_lr": TINY + ["train.epochs=1", "train.max_steps=3", "params.lr=1e30"],
    }
    procs = {}
    for name, overrides in jobs.items():
        cmd = [sys.executable, "-m", "genspec", "run", str(QUICKSTART), "--out", str(base / name), "--no-progress",
               *sets(overrides)]
        procs[name] = subprocess.Popen(cmd, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            results[name] = (proc.returncode, out, err, base / name)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_same_spec_and_seed_give_identical_runs_in_fresh_processes(process_runs):
    for name in ("a", "b"):
        rc, _, err, _ = process_runs[name]
        assert rc == 0, err
    a, b = process_runs["a"][3], process_runs["b"][3]
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (a, b))
    assert ma["test"] == mb["test"] and set(ma["test"]) == {"rec", "kl", "elbo"}
    assert ma["train_last_epoch"] == mb["train_last_epoch"]
    assert history(a) == history(b) and len(history(a)) == 2
    assert_same_tensors(checkpoint(a)["model"], checkpoint(b)["model"])


def test_fresh_process_matches_in_process_run(process_runs, resume_runs):
    # the 2-epoch process runs are the first 2 epochs of the in-process 3-epoch run
    full, _ = resume_runs
    assert history(process_runs["a"][3]) == history(full)[:2]


def test_different_seed_gives_a_different_run(tmp_path, resume_runs):
    rc, _, err = run_spec(QUICKSTART, tmp_path / "s1", *TINY, "train.epochs=1", "train.seed=1")
    assert rc == 0, err
    full, _ = resume_runs
    assert history(tmp_path / "s1")[0]["test"] != history(full)[0]["test"]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """(a 3-epoch run, the same run made of 1 epoch then --resume to 3)."""
    base = tmp_path_factory.mktemp("resume")
    full, part = base / "full", base / "part"
    rc, _, err = run_spec(QUICKSTART, full, *TINY, "train.epochs=3")
    assert rc == 0, err
    rc, _, err = run_spec(QUICKSTART, part, *TINY, "train.epochs=1")
    assert rc == 0, err
    assert len(history(part)) == 1 and checkpoint(part)["epoch"] == 1
    rc, _, err = run_spec(QUICKSTART, part, *TINY, "train.epochs=3", extra=["--resume"])
    assert rc == 0, err
    return full, part


def test_resume_continues_bit_for_bit(resume_runs):
    full, part = resume_runs
    assert history(full) == history(part)
    assert [r["epoch"] for r in history(part)] == [1, 2, 3]
    mf, mp = (json.loads((f / "metrics.json").read_text()) for f in (full, part))
    assert mf["test"] == mp["test"]
    assert mf["train_last_epoch"] == mp["train_last_epoch"]
    cf, cp = checkpoint(full), checkpoint(part)
    assert cf["epoch"] == cp["epoch"] == 3
    assert_same_tensors(cf["model"], cp["model"])
    assert torch.equal(cf["rng"], cp["rng"])


def test_resolved_spec_describes_the_resumed_run(resume_runs):
    _, part = resume_runs
    assert json.loads((part / "metrics.json").read_text())["epochs"] == 3
    assert yaml.safe_load((part / "spec.resolved.yaml").read_text())["train"]["epochs"] == 3
    assert genspec.load_run(part).spec.train["epochs"] == 3


def test_resume_to_fewer_epochs_than_done_is_refused(tmp_path, resume_runs):
    _, part = resume_runs
    run = tmp_path / "copy"
    shutil.copytree(part, run)
    before = folder_bytes(run)
    rc, _, err = run_spec(QUICKSTART, run, *TINY, "train.epochs=2", extra=["--resume"])
    assert rc == 1, f"exit {rc}; metrics.json epochs now {json.loads((run / 'metrics.json').read_text())['epochs']}"
    assert err == (f"genspec: {run} already has 3 epochs, more than the 2 asked; to train on, ask for more, e.g. --resume --set "
                   "train.epochs=13\n")
    assert folder_bytes(run) == before


def test_resume_finishes_a_run_interrupted_during_the_final_evaluation(tmp_path, resume_runs):
    full, part = resume_runs
    run = tmp_path / "copy"
    shutil.copytree(part, run)
    for name in ("metrics.json", "report.md"):  # what the final evaluation writes
        (run / name).unlink()
    rc, _, err = run_spec(QUICKSTART, run, *TINY, "train.epochs=3", extra=["--resume"])
    assert rc == 0, err
    assert history(run) == history(full)
    assert checkpoint(run)["epoch"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert metrics["test"] == json.loads((full / "metrics.json").read_text())["test"]


def test_resume_refuses_a_different_spec(tmp_path, resume_runs):
    _, part = resume_runs
    before = folder_bytes(part)
    rc, _, err = run_spec(QUICKSTART, part, *TINY, "train.epochs=4", "params.lr=0.002", extra=["--resume"])
    assert rc == 1
    assert "params.lr" in err and "0.001" in err and "0.002" in err
    assert "Traceback" not in err
    assert folder_bytes(part) == before


def test_resume_accepts_a_changed_description_of_the_paper(tmp_path, resume_runs):
    _, part = resume_runs
    run = tmp_path / "copy"
    shutil.copytree(part, run)
    rc, _, err = run_spec(QUICKSTART, run, *TINY, "train.epochs=4", "source.table=Table 9", "source.reading=wider",
                          "source.reported.nelbo=80", extra=["--resume"])
    assert rc == 0, err
    assert checkpoint(run)["epoch"] == 4


def test_resume_without_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_spec(QUICKSTART, tmp_path / "empty", *TINY, extra=["--resume"])
    assert rc == 1 and "nothing to resume" in err and "checkpoint.pt" in err


def test_resume_more_epochs_when_spec_has_no_train_section(tmp_path):
    doc = yaml.safe_load(QUICKSTART.read_text())
    del doc["train"]  # defaults: 10 epochs, batch 64
    doc["data"]["split"] = {"train": 32, "test": 16}  # one batch an epoch
    doc["evaluate"]["grids"] = []
    spec = write_yaml(tmp_path / "notrain.yaml", doc)
    rc, _, err = run_spec(spec, tmp_path / "run")
    assert rc == 0, err
    rc, _, err = run_spec(spec, tmp_path / "run", "train.epochs=11", extra=["--resume"])
    assert rc == 0, err
    assert [r["epoch"] for r in history(tmp_path / "run")] == list(range(1, 12))


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_is_complete_and_loads_weights_only(resume_runs):
    for folder in resume_runs:
        assert not list(folder.rglob("*.tmp"))
        state = checkpoint(folder)
        assert {"format", "epoch", "model", "rng"} <= set(state)
        assert set(state["model"]) == {"networks", "priors", "states", "optimizers"}
        assert {k.split(".")[0] for k in state["model"]["networks"]} == {"enc", "dec"}
        assert set(state["model"]["optimizers"]) == {"vae"}


def test_truncated_checkpoint_tmp_does_not_break_resume(tmp_path, resume_runs):
    full, _ = resume_runs
    run = tmp_path / "run"
    rc, _, err = run_spec(QUICKSTART, run, *TINY, "train.epochs=1")
    assert rc == 0, err
    good = (run / "checkpoint.pt").read_bytes()
    # a kill during torch.save leaves a partial temporary file next to the good checkpoint
    (run / "checkpoint.pt.tmp").write_bytes(good[: len(good) // 3])
    assert checkpoint(run)["epoch"] == 1
    rc, _, err = run_spec(QUICKSTART, run, *TINY, "train.epochs=2", extra=["--resume"])
    assert rc == 0, err
    assert not (run / "checkpoint.pt.tmp").exists()
    assert checkpoint(run)["epoch"] == 2
    assert history(run) == history(full)[:2]


# ---------------------------------------------------------------- non-finite losses

def test_huge_learning_rate_stops_with_a_clear_message(process_runs):
    rc, _, err, out = process_runs["huge_lr"]
    assert rc == 1
    assert "Traceback" not in err
    assert re.search(r"loss '(rec|kl|elbo)' became (nan|inf|-inf) at epoch 1, step [23]\b", err), err
    assert not (out / "checkpoint.pt").exists()  # nothing finished, so nothing was checkpointed


def blow_doc() -> dict:
    """A VAE trained in epoch 1, then an auxiliary network with SGD(lr=1e30) in epoch 2: it diverges there."""
    return {
        "genspec": 1, "name": "blow",
        "data": {"dataset": "digits", "split": {"train": 64, "test": 32}},
        "latent": {"z": {"shape": [4]}},
        "networks": {
            "enc": {"input": "x", "layers": ["flatten", "fc 16, relu", "gaussian 4"]},
            "dec": {"input": "z", "layers": ["fc 64, sigmoid", "reshape 1 8 8"]},
            "aux": {"input": "x", "layers": ["flatten", "fc 64", "reshape 1 8 8"]},
        },
        "graph": {"q": "enc(x)", "z": "rsample(q)", "x_rec": "dec(z)", "x_aux": "aux(x)"},
        "losses": {"rec": "sqerr(x_rec, x)", "kl": "kl(q, z)", "blow": "mse(x_aux, x)"},
        "objectives": {"vae": {"networks": ["enc", "dec"], "minimize": "rec + kl", "optimizer": "adam(1e-3)"},
                       "aux": {"minimize": "blow", "optimizer": "sgd(1e30)"}},
        "train": {"epochs": 2, "batch_size": 16, "device": "cpu",
                  "phases": [{"update": ["vae"], "epochs": [1, 1]}, {"update": ["aux"], "epochs": [2, 2]}]},
        "evaluate": {"losses": ["rec", "kl"]},
    }


def test_divergence_keeps_the_previous_checkpoint(tmp_path):
    spec = write_yaml(tmp_path / "blow.yaml", blow_doc())
    out = tmp_path / "run"
    rc, _, err = run_spec(spec, out)
    assert rc == 1
    assert re.search(r"loss 'blow' became (nan|inf) at epoch 2, step 2\b", err), err
    assert "Traceback" not in err
    state = checkpoint(out)
    assert state["epoch"] == 1
    assert not list(out.glob("*.tmp"))
    assert [r["epoch"] for r in history(out)] == [1]
    assert all(torch.isfinite(v).all() for v in state["model"]["networks"].values() if v.is_floating_point())
    # the kept checkpoint is a usable run: load_run reads it
    finished = genspec.load_run(out)
    assert finished.epoch == 1 and set(finished.networks) == {"enc", "dec", "aux"}


def test_divergence_on_the_last_step_is_not_reported_as_success(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_spec(QUICKSTART, out, *TINY, "train.epochs=1", "train.max_steps=1", "params.lr=1e30")
    assert rc == 1, f"exit {rc}; metrics.json test: {json.loads((out / 'metrics.json').read_text())['test'] if (out / 'metrics.json').exists() else None}"
    assert re.fullmatch(r"genspec: test loss '(rec|kl|elbo)' is (nan|inf|-inf) after epoch 1; the run stopped \(the last "
                        r"checkpoint is kept\)\. Try a smaller learning rate\.\n", err), err
    assert not (out / "metrics.json").exists()  # no report of a diverged run as a finished one


# ---------------------------------------------------------------- data

def digits_data(*overrides) -> dict:
    return genspec.load(QUICKSTART, list(overrides)).data


def test_digits_split_sizes_and_seed():
    data = digits_data("data.split={train: 100, val: 20, test: 50}")
    a = load_data(data, 0)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 20, 50)
    assert a.train.x.shape == (100, 1, 8, 8) and a.train.y.shape == (100,) and a.train.y.dtype == torch.int64
    b = load_data(data, 0)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    c = load_data(data, 1)
    assert not torch.equal(a.train.x, c.train.x) and not torch.equal(a.test.x, c.test.x)


def _rows(*splits):
    rows = torch.cat([torch.cat([s.x.flatten(1), s.y[:, None].float()], 1) for s in splits])
    return sorted(map(tuple, rows.tolist()))


def test_digits_splits_partition_the_dataset():
    # train, val and test drawn together use every image exactly once
    whole = load_data(digits_data("data.split={train: 1796, test: 1}"), 0)
    parts = load_data(digits_data("data.split={train: 1500, val: 97, test: 200}"), 3)
    assert _rows(parts.train, parts.val, parts.test) == _rows(whole.train, whole.test)


def test_digits_default_split_and_no_val():
    d = load_data(digits_data("data.split={test: 297}"), 0)
    assert (len(d.train), len(d.test)) == (1797 - 297, 297) and d.val is None


def test_split_larger_than_dataset_is_a_run_error():
    """Validation refuses it for datasets of known size (test_run_cli); loading checks it too, for
    the data whose size only the files tell (image folders) and for data sections built in code."""
    data = {**digits_data(), "split": {"train": 1700, "test": 200}}
    with pytest.raises(RunError, match="1797"):
        load_data(data, 0)


@pytest.mark.parametrize("value_range, low", [([0, 1], 0.0), ([-1, 1], -1.0)])
def test_digits_range_and_pad(value_range, low):
    plain = load_data(digits_data(f"data.range={value_range}"), 0).train.x
    assert plain.min().item() == low and plain.max().item() == 1.0
    # quickstart with a 12x12 decoder, so the padded spec validates
    padded_spec = genspec.load(QUICKSTART, [f"data.range={value_range}", "data.pad=2",
                                            "networks.dec.layers[2]=fc 144, sigmoid", "networks.dec.layers[3]=reshape 1 12 12"])
    assert padded_spec.data_shape == (1, 12, 12) and padded_spec.networks["enc"].input == (1, 12, 12)
    padded = load_data(padded_spec.data, 0).train.x
    assert padded.shape[1:] == (1, 12, 12)
    border = torch.ones(12, 12, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert torch.all(padded[:, 0][:, border] == low)
    assert torch.equal(padded[:, :, 2:-2, 2:-2], plain)


def test_missing_mnist_root_names_folder_and_files(tmp_path):
    missing = tmp_path / "no-data-here"
    data = {**DATA_DEFAULTS, "dataset": "mnist", "root": str(missing)}
    with pytest.raises(RunError) as exc:
        load_data(data, 0)
    msg = str(exc.value)
    assert str(missing.resolve()) in msg
    assert str(missing.resolve() / "MNIST" / "raw") in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert not missing.exists()  # nothing was downloaded or created


def _png(path: Path, w: int, h: int, mode: str = "RGB") -> None:
    """A w x h image, white in its centred square and black outside it."""
    from PIL import Image

    img = Image.new(mode, (w, h), 0)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img.paste(255 if mode == "L" else (255, 255, 255), (left, top, left + side, top + side))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_loads_with_centre_crop_and_resize(tmp_path, channels):
    root = tmp_path / "imgs"
    _png(root / "cats" / "a.png", 40, 20)   # landscape: black bands left and right
    _png(root / "cats" / "b.png", 20, 40)   # portrait: black bands top and bottom
    _png(root / "dogs" / "c.png", 30, 30, "L")
    _png(root / "dogs" / "d.PNG", 64, 16)
    (root / "dogs" / "notes.txt").write_text("not an image")
    data = {**DATA_DEFAULTS, "dataset": "image_folder", "root": str(root), "image_size": 6, "channels": channels,
            "split": {"train": 3, "test": 1}}
    d = load_data(data, 0)
    x = torch.cat([d.train.x, d.test.x])
    assert x.shape == (4, channels, 6, 6)
    # the centre crop keeps only the white square: a squashing resize would pull in the black bands
    assert torch.all(x > 0.99), x.amin(dim=(1, 2, 3))
    assert sorted(torch.cat([d.train.y, d.test.y]).tolist()) == [0, 0, 1, 1]
    ranged = load_data({**data, "range": [-1, 1], "pad": 1}, 0)
    assert ranged.train.x.shape[1:] == (channels, 8, 8)
    assert ranged.train.x[:, :, 0, :].max().item() == -1.0


def test_image_folder_missing_or_empty_is_a_run_error(tmp_path):
    data = {**DATA_DEFAULTS, "dataset": "image_folder", "image_size": 8, "root": str(tmp_path / "nope")}
    with pytest.raises(RunError, match="does not exist"):
        load_data(data, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no images"):
        load_data({**data, "root": str(tmp_path / "empty")}, 0)


def mnist_root() -> Path:
    root = os.environ.get("GENSPEC_DATA")
    if not root:
        pytest.skip("GENSPEC_DATA is not set: point it at the folder holding MNIST/raw to run the real-MNIST tests")
    if not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() and \
            not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files are absent under {root}/MNIST/raw")
    return Path(root)


def test_real_mnist_split_pad_and_range():
    root = mnist_root()
    data = {**DATA_DEFAULTS, "dataset": "mnist", "root": str(root), "pad": 2, "range": [-1, 1],
            "split": {"train": 100, "val": 10, "test": 50}}
    d = load_data(data, 0)
    assert (len(d.train), len(d.val), len(d.test)) == (100, 10, 50)
    assert d.train.x.shape == (100, 1, 32, 32)
    assert d.train.x.min().item() == -1.0 and d.train.x.max().item() == 1.0
    assert torch.all(d.train.x[:, :, :2, :] == -1.0)
    assert not torch.equal(d.train.x, load_data(data, 1).train.x)


def test_a_resume_replays_the_stream_of_each_process_that_saved_it(capsys):
    """A single process continues its own stream; under --nproc each rank continues its own, when
    the checkpoint holds as many ranks' streams. With another number of processes each rank starts
    a stream of its own (had every rank taken rank 0's, all would draw the same noise)."""
    from genspec.compiler.distributed import SINGLE, World
    from genspec.train.checkpoint import _restore_rng

    saved, expected = [], []
    for seed in (3, 4):  # rank 0's stream, rank 1's
        torch.manual_seed(seed)
        saved.append({"cpu": torch.get_rng_state()})
        expected.append(torch.rand(4))
    state = {"rng": saved[0]["cpu"], "rank_rng": saved}
    torch.manual_seed(99)
    _restore_rng(state, SINGLE, seed=0, epoch=2)
    assert torch.equal(torch.rand(4), expected[0])
    for rank in (0, 1):
        torch.manual_seed(99)
        _restore_rng(state, World(rank, 2, rank), seed=0, epoch=2)
        assert torch.equal(torch.rand(4), expected[rank])
    assert capsys.readouterr().err == ""
    draws = []
    for rank in (0, 1, 2):  # three processes resume a two-process checkpoint
        _restore_rng(state, World(rank, 3, rank), seed=0, epoch=2)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and not any(torch.equal(d, e) for d in draws for e in expected)
    err = capsys.readouterr().err
    assert err.count("holds the random streams of 2 processes, not 3") == 1  # rank 0 says it, once
    _restore_rng({"rng": saved[0]["cpu"]}, World(0, 2, 0), seed=0, epoch=2)
    assert "holds the random streams of one process, not 2" in capsys.readouterr().err


def test_on_a_terminal_a_bar_counts_the_steps_and_the_epoch_lines_go_above_it(tmp_path, monkeypatch):
    """Progress on a terminal: the bar listens to every step (and only there: off a terminal no
    hook listens to the steps at all), the epoch lines are written through it."""
    import io

    from genspec.compiler.distributed import SINGLE
    from genspec.experiments.run import run
    from genspec.train.hooks import Hooks, TrainingRun
    from genspec.train.progress import EpochLines, ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    spec = genspec.load(REPO / "specs" / "quickstart.yaml", ["train.epochs=2", "data.split={train: 96, test: 32}",
                                                             "train.batch_size=32"])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(spec, out=tmp_path / "run", progress=True)
    text = terminal.getvalue()
    assert "quickstart epoch 1/2" in text and "quickstart epoch 2/2" in text
    assert "6/6" in text  # 3 steps per epoch, 2 epochs
    def hooks(progress):
        return Hooks.attach(TrainingRun(spec, None, None, tmp_path, SINGLE, progress=progress))

    assert any(isinstance(h, ProgressBar) for h in hooks(True).attached)
    assert hooks(False).step_end == []
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # progress asked, but no terminal
    quiet = hooks(True)
    assert any(type(h) is EpochLines for h in quiet.attached) and quiet.step_end == []

