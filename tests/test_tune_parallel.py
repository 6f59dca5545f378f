"""`genspec tune --parallel K`: K trials at once, each in its own (spawned) worker process.

The trials train the tiny digits VAE of spec_helpers for one epoch on CPU (well under a second
each); most of the time goes into starting the two workers (each imports torch). Quasi-random
(Sobol) trials do not depend on the results before them, so a parallel run asks Ax for the same
parameterisations as a sequential one, and each trial, a deterministic CPU run, gives the same
numbers whichever process ran it.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from genspec.experiments.tune import parallel_count, trial_devices, worker_threads
from spec_helpers import cli_in_process as main, genspec_subprocess, tiny_digits_vae

# linear_operator warns on import; Ax uses pandas keywords that pandas has deprecated
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::Warning:ax")]


def tiny_beta_vae(tmp_path):
    text = tiny_digits_vae("tiny_beta_vae", "params: {beta: 1.0}\n")
    assert text.count("nelbo: rec + kl") == 1
    path = tmp_path / "tiny_beta_vae.yaml"
    path.write_text(text.replace("nelbo: rec + kl", "nelbo: rec + beta * kl"))
    return path


def read_trials(folder):
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


def tune_args(spec, out, trials, initial, *more):
    return ["tune", spec, "--param", "beta", "--range", "0.5", "4", "--trials", trials, "--initial", initial,
            "--metric", "rec", "--no-progress", "--out", out, *more]


def test_parallel_trials_equal_sequential_and_direct_runs(tmp_path, monkeypatch):
    import genspec.experiments.tune
    from genspec.graph.pipeline import load_spec
    from genspec.experiments.run import run
    from genspec.experiments.tune import _new_client, settings_from

    spec = tiny_beta_vae(tmp_path)
    saved = []  # the table's length at each save: one save per finished trial
    real_write = genspec.experiments.tune._write_table
    monkeypatch.setattr(genspec.experiments.tune, "_write_table", lambda out, table, settings: (
        saved.append(len(table)), real_write(out, table, settings)))

    # two workers; trials 0 and 1 are quasi-random, trial 2 comes from the GP fitted on what finished first
    out = tmp_path / "tune"
    rc, stdout, stderr = main(*tune_args(spec, out, 3, 2, "--parallel", 2))
    assert rc == 0, stderr
    assert saved == [1, 2, 3]
    rows = read_trials(out)
    assert [(int(r["trial"]), r["status"], r["folder"]) for r in rows] == [
        (i, "completed", f"trial_{i:03d}") for i in range(3)]
    assert sorted(p.name for p in out.glob("trial_*")) == [f"trial_{i:03d}" for i in range(3)]
    for r in rows:
        folder = out / r["folder"]
        assert (folder / "report.md").exists()
        assert yaml.safe_load((folder / "spec.resolved.yaml").read_text())["params"]["beta"] == float(r["beta"])
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"]["rec"] == pytest.approx(float(r["value"]), rel=1e-12)  # the objective
        assert 0.5 <= float(r["beta"]) <= 4 and math.isfinite(float(r["value"]))
    md = (out / "tune.md").read_text()
    assert md.startswith("# Tuning beta") and md.count("| completed |") == 3
    assert "(2 quasi-random initial trials, 3 in all)" in md
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = min(rows, key=lambda r: float(r["value"]))
    assert json.loads((out / "tune.json").read_text())["best"]["trial"] == int(best["trial"])
    assert f"(trial {best['trial']})" in stdout
    assert json.loads((out / "settings.json").read_text())["total"] == 3  # --parallel is how, not what: no setting

    # the quasi-random trials are the points a sequential run (one trial asked for at a time) tries
    settings = settings_from(str(spec), ["beta"], [(0.5, 4)], 3, 2, "rec", None, None, [])
    client = _new_client(settings, "tiny_beta_vae", 0)
    sequential = [client.get_next_trials(max_trials=1) for _ in range(2)]
    assert sequential == [{0: {"beta": float(rows[0]["beta"])}}, {1: {"beta": float(rows[1]["beta"])}}]

    # and every trial, the GP's too, has the metrics of a plain run of its parameters in this process
    for r in rows:
        direct = run(load_spec(spec, [f"params.beta={float(r['beta'])!r}"]), out=tmp_path / "direct", overwrite=True,
                     progress=False)
        trial = json.loads((out / r["folder"] / "metrics.json").read_text())
        assert trial["test"] == pytest.approx(direct["test"], rel=1e-6, abs=0)
        assert float(r["value"]) == pytest.approx(direct["test"]["rec"], rel=1e-6, abs=0)


def test_parallel_failed_trials_are_marked_failed(tmp_path):
    """Two trials diverge at the same time in two workers: each is marked failed with its reason."""
    spec = tiny_beta_vae(tmp_path)
    out = tmp_path / "tune"
    rc, stdout, stderr = main("tune", spec, "--param", "beta", "--range", "0.5", "4", "--trials", 2, "--initial", 2,
                              "--set", "objectives.vae.optimizer=adam(1e7)", "--metric", "rec", "--no-progress",
                              "--out", out, "--parallel", 2)
    assert rc == 1, stderr
    assert "tune: no trial completed" in stdout
    rows = read_trials(out)
    assert [(int(r["trial"]), r["status"], r["value"]) for r in rows] == [(0, "failed", "nan"), (1, "failed", "nan")]
    assert all("became" in r["note"] and "epoch 1" in r["note"] for r in rows), [r["note"] for r in rows]
    assert (out / "tune.md").read_text().count("| failed |") == 2
    assert json.loads((out / "tune.json").read_text())["best"] is None


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_bad_parallel_is_a_one_line_error(tmp_path, value):
    spec = tiny_beta_vae(tmp_path)
    rc, _, stderr = main(*tune_args(spec, tmp_path / "t", 2, 2, "--parallel", value))
    assert rc == 1
    assert stderr == f"genspec: --parallel must be a positive integer (trials run at once), got {value or repr(value)}\n"
    assert not (tmp_path / "t").exists()


def test_bad_parallel_from_the_shell(tmp_path):
    spec = tiny_beta_vae(tmp_path)
    result = genspec_subprocess(*tune_args(spec, tmp_path / "t", 2, 2, "--parallel", "many"), timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "genspec: --parallel must be a positive integer (trials run at once), got many"]
    assert not (tmp_path / "t").exists()


def test_parallel_count():
    assert parallel_count(3) == parallel_count("3") == parallel_count(" 3 ") == 3
    for bad in (0, -1, 1.0, True, None, "x"):
        with pytest.raises(Exception, match="--parallel must be a positive integer"):
            parallel_count(bad)


def test_devices_round_robin_over_several_gpus_only():
    assert trial_devices("auto", 2, 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert trial_devices("cuda", 4, 2) == ["cuda:0", "cuda:1"]
    assert trial_devices("auto", 1, 2) == [None, None]  # one GPU (or none): the spec's own device for every trial
    assert trial_devices("auto", 0, 2) == [None, None]
    assert trial_devices("cpu", 4, 2) == [None, None]  # a spec that asks for the CPU keeps it
    assert trial_devices("cuda:1", 4, 2) == [None, None]  # ... and one that names its GPU


def test_worker_threads_share_the_cores():
    assert worker_threads(2, cpus=2) == 1
    assert worker_threads(3, cpus=2) == 1
    assert worker_threads(4, cpus=16) == 4
    assert worker_threads(3, cpus=16) == 5
    assert worker_threads(2) >= 1
