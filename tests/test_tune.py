"""`genspec tune`: Bayesian optimisation of spec params with Ax, each trial a real (tiny) run.

Trials train the beta-VAE on 200 digits for one epoch, a few seconds each. The basic test runs
the command as a user does (a subprocess); the others call `genspec.cli.main` in-process to
spare the interpreter start-up, and a few inject a failure or an interrupt into one trial.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from genspec.errors import RunError
from spec_helpers import cli_in_process as main, genspec_subprocess

REPO = Path(__file__).resolve().parent.parent
BETA_VAE = REPO / "specs" / "beta_vae_digits.yaml"
TINY = ["--set", "train.epochs=1", "--set", "data.split.train=200", "--set", "data.split.test=100", "--no-progress"]

# linear_operator warns on import; Ax uses pandas keywords that pandas has deprecated
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::Warning:ax")]


def genspec_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return genspec_subprocess(*args, timeout=timeout)




def read_trials(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


def mtimes(folder: Path, trials) -> dict:
    return {i: (folder / f"trial_{i:03d}" / "metrics.json").stat().st_mtime_ns for i in trials}


# ---------------------------------------------------------------- the basic run (un-marked)

def test_tune_beta_end_to_end(tmp_path):
    out = tmp_path / "tune"
    result = genspec_cli("tune", BETA_VAE, "--param", "beta", "--trials", 3, "--initial", 2, *TINY, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    rows = read_trials(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert all(r["status"] == "completed" for r in rows), rows
    betas = [float(r["beta"]) for r in rows]
    values = [float(r["value"]) for r in rows]
    assert all(0.1 <= b <= 10 for b in betas), betas  # the spec's tune.beta.range
    assert len(set(betas)) == 3
    assert all(math.isfinite(v) for v in values)

    # each trial is a real run with the tried beta and the --set overrides
    for r in rows:
        folder = out / r["folder"]
        resolved = yaml.safe_load((folder / "spec.resolved.yaml").read_text())
        assert resolved["params"]["beta"] == pytest.approx(float(r["beta"]), rel=1e-12)
        assert resolved["train"]["epochs"] == 1 and resolved["data"]["split"] == {"train": 200, "test": 100}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"]["rec"] == pytest.approx(float(r["value"]), rel=1e-12)  # the objective: tune.objective.metric

    # the best point is the minimum of the table, everywhere it is reported
    best = min(rows, key=lambda r: float(r["value"]))
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best"]["trial"] == int(best["trial"])
    assert summary["best"]["value"] == pytest.approx(float(best["value"]), rel=1e-12)
    assert summary["metric"] == "rec" and summary["minimize"] is True
    assert f"tune: best beta = {float(best['beta']):.5g}: rec = {float(best['value']):.5g} (trial {best['trial']})" \
        in result.stdout
    md = (out / "tune.md").read_text()
    assert md.startswith("# Tuning beta")
    assert (f"Best: beta = {float(best['beta']):.5g} with rec = {float(best['value']):.5g} (trial {best['trial']}, "
            f"[{best['folder']}]({best['folder']}/report.md))") in md
    assert "| trial | beta | status | rec | note |" in md
    assert md.count("| completed |") == 3
    assert "(2 quasi-random initial trials, 3 in all)" in md
    assert "beta in [0.1, 10] (log)" in md

    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = json.loads((out / "ax_client.json").read_text())
    assert isinstance(client, dict) and client
    settings = json.loads((out / "settings.json").read_text())
    assert settings["total"] == 3 and settings["initial"] == 2 and settings["metric"] == "rec"


# ---------------------------------------------------------------- errors before any trial

def test_unknown_param_is_a_clear_error(tmp_path):
    result = genspec_cli("tune", BETA_VAE, "--param", "nosuch", "--trials", 1, "--out", tmp_path / "t", "--no-progress")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "genspec: --param nosuch: the spec has no param 'nosuch' (params: beta, sigma2, lr)" in result.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args, message", [
    (["--param", "beta", "--range", "1", "2", "--param", "lr"], "--range given 1 time(s) for 2 param(s)"),
    (["--param", "lr"], "param lr: give a range LO < HI"),
    (["--param", "beta", "--range", "3", "1"], "param beta: give a range LO < HI"),
    (["--param", "beta", "--strategy", "grid"], "unknown strategy 'grid'"),
    (["--param", "beta", "--range", "1", "2", "--trials", "0"], "genspec: --trials must be at least 1, got 0"),
    (["--param", "beta", "--range", "1", "2", "--initial", "0"], "genspec: --initial must be at least 1, got 0"),
    (["--param", "beta", "--range", "1", "2", "--metric", "elbow"],
     "genspec: --metric elbow: no run of this spec reports it; it reports rec, kl, elbo, rec_best, kl_best, elbo_best (did you mean 'elbo'?)"),
    (["--param", "beta", "--range", "1", "2", "--metric", "fid"], "--metric fid: no run of this spec reports it"),
])
def test_bad_settings_are_clear_errors(tmp_path, args, message):
    rc, stdout, stderr = main("tune", BETA_VAE, *args, "--out", tmp_path / "t", "--no-progress")
    assert rc == 1
    assert message in stderr
    assert not (tmp_path / "t").exists()


def test_resume_needs_a_tuning_run(tmp_path):
    (tmp_path / "t").mkdir()
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--out", tmp_path / "t", "--resume",
                         *TINY)
    assert rc == 1 and "nothing to resume" in stderr and "ax_client.json" in stderr


# ---------------------------------------------------------------- failed trials

def test_diverging_trials_fail_and_tuning_goes_on(tmp_path):
    out = tmp_path / "tune"
    result = genspec_cli("tune", BETA_VAE, "--param", "lr", "--range", "1e6", "1e7", "--trials", 3, "--initial", 2,
                         *TINY, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr  # no trial completed
    assert "tune: no trial completed" in result.stdout
    assert "Traceback" not in result.stderr
    rows = read_trials(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]  # went on to the requested count
    assert all(r["status"] == "failed" for r in rows)
    assert all(1e6 <= float(r["lr"]) <= 1e7 for r in rows)
    assert all(r["value"] == "nan" for r in rows)
    assert all("became" in r["note"] and "epoch 1" in r["note"] for r in rows), [r["note"] for r in rows]
    md = (out / "tune.md").read_text()
    assert md.count("| failed |") == 3
    assert "Best:" not in md
    assert json.loads((out / "tune.json").read_text())["best"] is None


@pytest.mark.slow
def test_one_failed_trial_among_completed(tmp_path, monkeypatch):
    """Trial 1 fails (its run raises RunError); trials 0 and 2 complete; the best is theirs."""
    import genspec.experiments.run

    real_run, calls = genspec.experiments.run.run, []

    def flaky_run(spec, out=None, **kwargs):
        calls.append(Path(out).name)
        if len(calls) == 2:
            raise RunError("injected failure\nsecond line")
        return real_run(spec, out=out, **kwargs)

    monkeypatch.setattr(genspec.experiments.run, "run", flaky_run)
    out = tmp_path / "tune"
    rc, stdout, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 3, "--initial", 2, *TINY, "--out", out)
    assert rc == 0, stderr
    assert calls == ["trial_000", "trial_001", "trial_002"]
    rows = {int(r["trial"]): r for r in read_trials(out)}
    assert [rows[i]["status"] for i in range(3)] == ["completed", "failed", "completed"]
    assert rows[1]["note"] == "injected failure"  # first line only
    best = min((rows[0], rows[2]), key=lambda r: float(r["value"]))
    assert f"(trial {best['trial']})" in stdout
    md = (out / "tune.md").read_text()
    assert re.search(r"\| \[1\]\(trial_001/report.md\) \| [0-9.e+-]+ \| failed \| nan \| injected failure \|", md), md


# ---------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(tmp_path):
    out = tmp_path / "tune"
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 2, "--initial", 2, *TINY, "--out", out)
    assert rc == 0, stderr
    first = read_trials(out)
    assert [r["status"] for r in first] == ["completed", "completed"]
    before = mtimes(out, (0, 1))

    # a second start without --resume is refused and changes nothing
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 3, *TINY, "--out", out)
    assert rc == 1 and "--resume" in stderr
    assert mtimes(out, (0, 1)) == before

    rc, stdout, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 3, "--initial", 2, *TINY, "--out", out,
                              "--resume")
    assert rc == 0, stderr
    assert "tune: trial 0 " not in stderr and "tune: trial 1 " not in stderr
    assert "tune: trial 2 " in stderr
    assert mtimes(out, (0, 1)) == before  # trials 0 and 1 were not re-run
    rows = read_trials(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert rows[:2] == first
    assert rows[2]["status"] == "completed"
    assert (out / "trial_002" / "metrics.json").exists()
    best = min(rows, key=lambda r: float(r["value"]))
    assert json.loads((out / "tune.json").read_text())["best"]["trial"] == int(best["trial"])


@pytest.mark.slow
def test_resume_after_an_interrupted_trial(tmp_path, monkeypatch):
    """A kill during trial 2 (KeyboardInterrupt): trials 0 and 1 are kept, --resume runs trial 2 again."""
    import genspec.experiments.run

    real_run, calls = genspec.experiments.run.run, []

    def interrupted_run(spec, out=None, **kwargs):
        calls.append(Path(out).name)
        if len(calls) == 3:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "metrics.jsonl").write_text("half a trial\n")
            raise KeyboardInterrupt
        return real_run(spec, out=out, **kwargs)

    monkeypatch.setattr(genspec.experiments.run, "run", interrupted_run)
    out = tmp_path / "tune"
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 3, "--initial", 2, *TINY, "--out", out)
    assert rc == 130, stderr
    assert [int(r["trial"]) for r in read_trials(out)] == [0, 1]
    before = mtimes(out, (0, 1))

    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 3, "--initial", 2, *TINY, "--out", out,
                         "--resume")
    assert rc == 0, stderr
    assert calls == ["trial_000", "trial_001", "trial_002", "trial_002"]
    assert mtimes(out, (0, 1)) == before
    rows = read_trials(out)
    assert [(int(r["trial"]), r["status"]) for r in rows] == [(0, "completed"), (1, "completed"), (2, "completed")]
    assert "half a trial" not in (out / "trial_002" / "metrics.jsonl").read_text()


# ---------------------------------------------------------------- what a stop or a second process leaves

def test_resume_with_other_settings_is_refused(tmp_path):
    """--resume continues a tuning only as it was set up (more trials aside): another metric or
    direction would rank trials measured two ways in one table."""
    out = tmp_path / "tune"
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--initial", 1, *TINY, "--out", out)
    assert rc == 0, stderr
    before = (out / "trials.csv").read_text()
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 2, "--initial", 1, "--metric", "kl",
                         *TINY, "--out", out, "--resume")
    assert rc == 1 and "Traceback" not in stderr
    assert "it was tuned with other settings" in stderr and "metric: 'rec' -> 'kl'" in stderr
    assert (out / "trials.csv").read_text() == before


def test_a_damaged_client_file_is_a_clear_error(tmp_path):
    out = tmp_path / "tune"
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--initial", 1, *TINY, "--out", out)
    assert rc == 0, stderr
    (out / "ax_client.json").write_text("")  # as an in-place write killed half-way left it, before it was atomic
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 2, "--initial", 1, *TINY, "--out", out,
                         "--resume")
    assert rc == 1 and "Traceback" not in stderr
    assert f"cannot resume: {out / 'ax_client.json'} is unreadable" in stderr and "--overwrite" in stderr


def test_a_stop_between_the_table_and_the_client_loses_no_trial(tmp_path, monkeypatch):
    """trials.csv is saved before ax_client.json: a stop between the two leaves a trial finished
    in the table and running in the client, which --resume finishes in the client, not again."""
    import genspec.experiments.tune

    real_save, saves = genspec.experiments.tune._save_client, []

    def stop_after_first_trial(client, path):
        saves.append(path)
        if len(saves) == 2:  # the first save marks trial 0 running; the second would record it finished
            raise KeyboardInterrupt
        real_save(client, path)

    out = tmp_path / "tune"
    with monkeypatch.context() as patch:
        patch.setattr(genspec.experiments.tune, "_save_client", stop_after_first_trial)
        rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 2, "--initial", 2, *TINY, "--out", out,
                             "--parallel", 1)
    assert rc == 130 and "--resume continues the tuning" in stderr
    assert [r["status"] for r in read_trials(out)] == ["completed"]
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 2, "--initial", 2, *TINY, "--out", out,
                         "--resume")
    assert rc == 0, stderr
    assert "tune: trial 0 " not in stderr and "tune: trial 1 " in stderr
    rows = read_trials(out)
    assert [(int(r["trial"]), r["status"]) for r in rows] == [(0, "completed"), (1, "completed")]
    from genspec.experiments.tune import _load_client

    trials = _load_client(out / "ax_client.json")._experiment.trials
    assert [trials[i].status.is_completed for i in (0, 1)] == [True, True]


def test_an_interrupted_overwrite_keeps_the_old_tuning(tmp_path, monkeypatch):
    import genspec.experiments.run

    out = tmp_path / "tune"
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--initial", 1, *TINY, "--out", out)
    assert rc == 0, stderr
    old = (out / "trials.csv").read_text()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.experiments.run, "run", interrupted)
        rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--initial", 1, *TINY, "--out", out,
                             "--overwrite")
    backup = tmp_path / ".tune.replaced"
    assert rc == 130 and f"the tuning --overwrite was replacing is kept in {backup}" in stderr
    assert (backup / "trials.csv").read_text() == old and (backup / "trial_000" / "metrics.json").exists()
    rc, _, stderr = main("tune", BETA_VAE, "--param", "beta", "--trials", 1, "--initial", 1, *TINY, "--out", out,
                         "--overwrite")
    assert rc == 0, stderr
    assert not backup.exists() and (out / "trial_000" / "metrics.json").exists()


def test_a_tune_section_naming_an_unknown_param_says_so(tmp_path):
    spec = yaml.safe_load(BETA_VAE.read_text())
    spec["tune"] = {"betta": {"range": [0.1, 10]}}
    spec["extends"] = str(REPO / "specs" / spec["extends"])  # the copy lives elsewhere
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rc, _, stderr = main("tune", path, "--trials", 1, "--out", tmp_path / "t", "--no-progress")
    assert rc == 1 and "Traceback" not in stderr
    assert "the tune section names betta: the spec has no param 'betta'" in stderr and "did you mean 'beta'?" in stderr


def _with_points(tmp_path: Path, beta: dict, trials: dict) -> Path:
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump({"genspec": 1, "name": "beta_points", "extends": str(BETA_VAE),
                                    "tune": {"beta": {"range": [0.1, 10], **beta}, "trials": trials}}))
    return path


def test_given_points_are_the_first_trials_then_the_surrogate_suggests(tmp_path):
    # the VAE-GAN paper's search: beta = 1, 50, 100, 150 by hand, then the acquisition's choice
    spec = _with_points(tmp_path, {"points": [0.5, 2.0]}, {"initial": 2, "total": 3})
    rc, _, stderr = main("tune", spec, *TINY, "--out", tmp_path / "t")
    assert rc == 0, stderr
    rows = read_trials(tmp_path / "t")
    assert [float(r["beta"]) for r in rows[:2]] == [0.5, 2.0] and len(rows) == 3
    assert float(rows[2]["beta"]) not in (0.5, 2.0) and all(r["status"] == "completed" for r in rows)
    settings = json.loads((tmp_path / "t" / "settings.json").read_text())
    assert settings["points"] == [{"beta": 0.5}, {"beta": 2.0}] and settings["initial"] == 2
    assert "2 initial trials at the given points" in (tmp_path / "t" / "tune.md").read_text()


@pytest.mark.parametrize("beta, trials, message", [
    ({"points": [0.5, 20.0]}, {"total": 3}, "tune.beta.points: 20 is outside the range [0.1, 10]"),
    ({"points": [0.5, 1, 2]}, {"total": 2}, "3 given points (tune.NAME.points) but 2 trials in all"),
])
def test_bad_points_are_refused_before_a_trial_runs(tmp_path, beta, trials, message):
    rc, _, stderr = main("tune", _with_points(tmp_path, beta, trials), *TINY, "--out", tmp_path / "t")
    assert rc == 1 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "t").exists()


def test_points_must_cover_every_tuned_param_unless_the_command_line_replaces_them(tmp_path):
    spec = _with_points(tmp_path, {"points": [0.5]}, {"total": 2})
    doc = yaml.safe_load(spec.read_text())
    doc["tune"]["lr"] = {"range": [1e-4, 1e-2]}
    spec.write_text(yaml.safe_dump(doc))
    rc, _, stderr = main("tune", spec, "--param", "beta", "--param", "lr", *TINY, "--out", tmp_path / "t")
    assert rc == 1 and "give every tuned param a list of points, all of one length (given: beta 1; tuned: beta, lr)" in stderr
    from genspec.experiments.tune import settings_from

    assert settings_from(str(spec), ["beta"], [], 2, 1, None, None, None, []).points == []  # --initial: quasi-random
    assert settings_from(str(spec), ["beta"], [(0.1, 5)], 2, None, None, None, None, []).points == []  # --range
