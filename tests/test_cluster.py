"""`--executor slurm`: a study's runs and a tuning's trials as jobs through submitit.

There is no SLURM cluster here, so the jobs go to submitit's `debug` cluster (each job in this
process) or its `local` one (each job a process of its own), chosen with
GENSPEC_SUBMITIT_CLUSTER: everything else (the job callables, the job arrays, the folders, how
results come back) is the path a real cluster takes. The runs are the tiny digits VAE of
spec_helpers, one epoch each.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest

from genspec.experiments.cluster import (JOBS_FOLDER, LOCAL_TIMEOUT_MIN, Resources, SUBMITIT_CLUSTER, executor_from,
                                         submitit_parameters)
from genspec.lang.registry import CLUSTER_KEYS
from spec_helpers import cli_in_process as main, problems_of, tiny_digits_vae

submitit = pytest.importorskip("submitit")  # the test extra installs it; without it only these tests are skipped

# linear_operator warns on import; Ax uses pandas keywords that pandas has deprecated
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::Warning:ax")]

STUDY = tiny_digits_vae("tiny_cluster_study", textwrap.dedent("""\
    sweep:
      width:
        w16: {}
        w8: {networks: {enc: {layers: {1: "fc 8, relu"}}}}
    repeats: 2
    cluster: {partition: cpu, time: 30, mem: 2, cpus: 4}
    """))
RUNS = [f"width={w}/seed{s}" for w in ("w16", "w8") for s in (0, 1)]


def tables(out: Path) -> dict:
    """Every study CSV but the timing one (wall-clock times differ from run to run), as rows."""
    return {path.name: list(csv.reader(path.open())) for path in sorted(out.glob("study_*.csv"))
            if "time_per_epoch" not in path.name}


def recording_update_parameters(monkeypatch) -> list[dict]:
    """Every `update_parameters` call of submitit's AutoExecutor, recorded (and made)."""
    calls = []
    real = submitit.AutoExecutor.update_parameters

    def record(self, **kwargs):
        calls.append(dict(kwargs))
        return real(self, **kwargs)

    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", record)
    return calls


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The same study trained here (--executor local) and as jobs on submitit's debug cluster,
    with the spec's cluster section and two flags over it."""
    root = tmp_path_factory.mktemp("cluster_study")
    spec = root / "tiny_cluster_study.yaml"
    spec.write_text(STUDY)
    rc, _, err = main("run", spec, "--out", root / "local", "--no-progress")
    assert rc == 0, err
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
        calls = recording_update_parameters(monkeypatch)
        rc, _, err = main("run", spec, "--out", root / "jobs", "--no-progress", "--executor", "slurm",
                          "--slurm-partition", "gpu", "--slurm-gpus", "1", "--parallel", "3")
    assert rc == 0, err
    return spec, root, calls, err


def test_a_study_as_jobs_gives_the_tables_of_a_local_study(studies):
    _, root, _, err = studies
    assert "study: 4 jobs submitted" in err and "study: 4 run(s) trained, 0 skipped" in err
    local, jobs = tables(root / "local"), tables(root / "jobs")
    assert sorted(local) == sorted(jobs) and "study_test_nelbo.csv" in jobs
    assert jobs == local  # the same rows and values: each job ran the same (deterministic CPU) run
    for run in RUNS:
        ours = json.loads((root / "jobs" / run / "metrics.json").read_text())
        theirs = json.loads((root / "local" / run / "metrics.json").read_text())
        assert ours["test"] == theirs["test"] and ours["seed"] == theirs["seed"]
    text = (root / "jobs" / "study.md").read_text()
    assert "4 of 4 runs finished" in text


def test_each_job_has_a_submitit_folder_with_its_logs(studies):
    _, root, _, err = studies
    folders = sorted(p for p in (root / "jobs" / JOBS_FOLDER).iterdir() if p.is_dir())
    assert len(folders) == 4  # <out>/slurm/<job id>/, submitit's %j
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == [f"{folder.name}_0_log.err", f"{folder.name}_0_log.out"]
        assert f"done (job {folder.name})" in err


def test_flags_over_the_cluster_section_reach_the_executor(studies):
    _, _, calls, err = studies
    # one set of resources for the four runs: one array, and its parameters once
    assert calls == [{"name": "genspec-tiny_cluster_study", "slurm_partition": "gpu", "timeout_min": 30,
                      "gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 2, "slurm_array_parallelism": 3}]
    assert "(partition gpu, time 30 min, gpus 1, cpus 4, mem 2 GB; submitit's debug cluster)" in err


def test_submitit_parameters_leave_unset_resources_to_the_cluster():
    assert submitit_parameters(Resources(), "n", 1, "slurm") == {"name": "n"}
    # submitit's local jobs stop after 2 minutes unless told otherwise
    assert submitit_parameters(Resources(), "n", 1, "local") == {"name": "n", "timeout_min": LOCAL_TIMEOUT_MIN}
    assert Resources(gpus=2).over({"gpus": 1, "mem": 8}) == Resources(gpus=2, mem=8)
    assert tuple(CLUSTER_KEYS) == ("partition", "time", "gpus", "cpus", "mem")


def test_resources_per_configuration_make_one_array_each(studies, tmp_path, monkeypatch):
    """A sweep level that asks for other resources (a bigger model, more memory) goes to an
    array of its own; the cluster section is where a run trains, not what it is, so the runs
    trained before with other resources are finished runs of this study, and skipped."""
    spec, root, _, _ = studies
    leveled = tmp_path / "leveled.yaml"
    leveled.write_text(spec.read_text().replace('w8: {networks:', 'w8: {cluster: {mem: 6}, networks:'))
    monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
    calls = recording_update_parameters(monkeypatch)
    out = tmp_path / "out"
    rc, _, err = main("run", leveled, "--out", out, "--no-progress", "--executor", "slurm")
    assert rc == 0, err
    assert sorted(call["mem_gb"] for call in calls) == [2, 6] and err.count("2 jobs submitted") == 2
    rc, _, err = main("run", leveled, "--out", out, "--no-progress", "--executor", "slurm", "--slurm-partition", "big")
    assert rc == 0, err
    assert "study: 0 run(s) trained, 4 skipped" in err and "submitted" not in err


def test_a_failed_job_is_named_and_the_others_finish(tmp_path, monkeypatch):
    """A run that genspec refuses (its folder holds someone else's file) fails its job with
    genspec's message; the other job's run finishes, and the study says which failed."""
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    out = tmp_path / "out"
    (out / "width=w8" / "seed1").mkdir(parents=True)
    (out / "width=w8" / "seed1" / "notes.txt").write_text("mine")
    monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
    rc, _, err = main("run", spec, "--out", out, "--no-progress", "--executor", "slurm", "--only", "width=w8")
    assert rc == 1 and "Traceback" not in err
    assert (out / "width=w8" / "seed0" / "metrics.json").exists()
    assert not (out / "width=w8" / "seed1" / "metrics.json").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("genspec: [2/2] width=w8 seed 1: ") and "is not empty and is not a genspec run folder" in last
    assert "run the study again" in last and "_log.err" in last  # where the job's log is


# ---------------------------------------------------------------- preemption

def spy_on_restore(monkeypatch) -> list[int]:
    """The first epoch each resumed run trains (after genspec's checkpoint restore), recorded."""
    import genspec.experiments.run
    from genspec.train.checkpoint import restore

    started = []

    def spy(*args, **kwargs):
        epoch, history = restore(*args, **kwargs)
        started.append(epoch)
        return epoch, history

    monkeypatch.setattr(genspec.experiments.run, "restore", spy)
    return started


def stop_after_epoch_1(spec, folder: Path) -> None:
    """`folder` as a job preempted in epoch 2 of `spec` leaves it: the checkpoint of epoch 1
    (train.checkpoint_every is 1), no metrics.json."""
    from genspec.experiments.run import run
    from genspec.lang.resolve import apply_overrides
    from genspec.graph.pipeline import check
    from genspec.lang.loader import Document

    doc = spec.doc
    first = check(apply_overrides(Document(json.loads(json.dumps(doc.data)), dict(doc.locations), doc.file),
                                  ["train.epochs=1"]))
    run(first, out=folder, progress=False)
    (folder / "metrics.json").unlink()


def test_a_requeued_run_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    from genspec.experiments.jobs import RunOrder, TrainRun
    from genspec.experiments.run import run
    from spec_helpers import check

    spec = check(tiny_digits_vae("preempted").replace("epochs: 1", "epochs: 2"))
    folder = tmp_path / "run"
    stop_after_epoch_1(spec, folder)
    doc = spec.doc
    order = RunOrder((doc.data, dict(doc.locations), doc.file), str(folder), resume=False, overwrite=False)
    job = TrainRun()
    assert "already holds a run" in job(order)["error"]  # as first submitted, the order was to start afresh

    # what submitit requeues on preemption: the same job, its order now marked requeued
    delayed = job.checkpoint(order)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    assert delayed.args[0] == RunOrder(order.document, order.folder, False, False, requeued=True)
    started = spy_on_restore(monkeypatch)
    result = delayed.result()
    assert started == [2]  # went on from epoch 1's checkpoint
    epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    straight = run(spec, out=tmp_path / "straight", progress=False)
    assert result["metrics"]["test"] == straight["test"]  # as if never stopped

    # requeued again after it finished (preempted before the job returned): its metrics, no training
    stamp = (folder / "metrics.json").stat().st_mtime_ns
    again = job.checkpoint(order).result()
    assert again["metrics"] == result["metrics"] and started == [2]
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp


def test_a_requeued_trial_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    from genspec.experiments.jobs import TrainTrial, TrialOrder
    from genspec.experiments.tune import _trial_in_job, settings_from
    from genspec.graph.pipeline import load_spec

    text = tiny_digits_vae("preempted", "params: {beta: 1.0}\n").replace("nelbo: rec + kl", "nelbo: rec + beta * kl")
    spec_path = tmp_path / "beta.yaml"
    spec_path.write_text(text.replace("epochs: 1", "epochs: 2"))
    settings = settings_from(str(spec_path), ["beta"], [(0.5, 4)], 2, 2, "rec", None, None, [])
    out = tmp_path / "tune"
    stop_after_epoch_1(load_spec(spec_path, ["params.beta=2.0"]), out / "trial_000")
    order = TrialOrder(_trial_in_job, str(spec_path), settings, 0, {"beta": 2.0}, str(out))
    job = TrainTrial()
    delayed = job.checkpoint(order)
    assert delayed.function is job
    assert delayed.args[0] == TrialOrder(_trial_in_job, str(spec_path), settings, 0, {"beta": 2.0}, str(out), resume=True)
    started = spy_on_restore(monkeypatch)
    row = delayed.result()
    assert started == [2] and row["status"] == "completed" and row["trial"] == 0
    metrics = json.loads((out / "trial_000" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and row["value"] == metrics["test"]["rec"]


# ---------------------------------------------------------------- tuning

def beta_spec(tmp_path, tail: str = "") -> Path:
    text = tiny_digits_vae("tiny_beta_vae", "params: {beta: 1.0}\n" + tail)
    spec = tmp_path / "beta.yaml"
    spec.write_text(text.replace("nelbo: rec + kl", "nelbo: rec + beta * kl"))
    return spec


def tune_as_jobs(spec, out, trials, *more):
    return main("tune", spec, "--param", "beta", "--range", "0.5", "4", "--trials", trials, "--initial", trials,
                "--metric", "rec", "--no-progress", "--out", out, "--executor", "slurm", *more)


def assert_rows_of_plain_runs(spec, rows, tmp_path) -> None:
    from genspec.experiments.run import run
    from genspec.graph.pipeline import load_spec

    for r in rows:
        direct = run(load_spec(spec, [f"params.beta={float(r['beta'])!r}"]), out=tmp_path / "direct", overwrite=True,
                     progress=False)
        assert r["status"] == "completed"
        assert float(r["value"]) == pytest.approx(direct["test"]["rec"], rel=1e-6, abs=0)


def test_two_trials_as_jobs_match_plain_runs(tmp_path, monkeypatch):
    """Two quasi-random trials, two jobs at once (--parallel 2), each recorded in Ax as it ends:
    the rows of trials.csv are those of plain runs of the same parameters here."""
    spec = beta_spec(tmp_path, "cluster: {cpus: 1}\n")
    monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
    calls = recording_update_parameters(monkeypatch)
    out = tmp_path / "tune"
    rc, stdout, err = tune_as_jobs(spec, out, 2, "--parallel", 2, "--slurm-time", 5)
    assert rc == 0, err
    assert calls == [{"name": f"genspec-tiny_beta_vae-trial{i}", "timeout_min": 5, "cpus_per_task": 1} for i in (0, 1)]
    # both submitted before either is waited for
    assert err.index("trial 1 submitted as job") < err.index("tune: trial 0 completed")
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1"] and rows[0]["beta"] != rows[1]["beta"]
    assert_rows_of_plain_runs(spec, rows, tmp_path)
    best = min(rows, key=lambda r: float(r["value"]))
    assert json.loads((out / "tune.json").read_text())["best"]["trial"] == int(best["trial"])
    assert f"(trial {best['trial']})" in stdout


def test_a_trial_as_a_job_in_a_process_of_its_own(tmp_path, monkeypatch):
    """submitit's local cluster: the trial's job is a process of its own, which receives its
    order pickled and hands back its row pickled in its job folder, beside its log."""
    spec = beta_spec(tmp_path)
    monkeypatch.setenv(SUBMITIT_CLUSTER, "local")
    calls = recording_update_parameters(monkeypatch)
    out = tmp_path / "tune"
    rc, _, err = tune_as_jobs(spec, out, 1)
    assert rc == 0, err
    assert calls == [{"name": "genspec-tiny_beta_vae-trial0", "timeout_min": LOCAL_TIMEOUT_MIN}]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert_rows_of_plain_runs(spec, rows, tmp_path)
    folder, = (p for p in (out / JOBS_FOLDER).glob("[0-9]*") if p.is_dir())  # <out>/slurm/<job id>/
    outcome, row = submitit.core.utils.pickle_load(folder / f"{folder.name}_0_result.pkl")
    assert outcome == "success" and row["trial"] == 0 and row["value"] == float(rows[0]["value"])
    assert "tune: trial 0 completed" in (folder / f"{folder.name}_0_log.err").read_text()  # the run printed there
    assert f"tune: trial 0 submitted as job {folder.name}" in err


# ---------------------------------------------------------------- what is refused, and how

def test_a_bad_cluster_section_is_a_located_spec_error():
    text = tiny_digits_vae("bad", "cluster: {partion: gpu, time: 0}\n")
    line = text.splitlines().index("cluster: {partion: gpu, time: 0}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:11: cluster.partion: unknown key 'partion'; did you mean 'partition'?",
                                 f"spec.yaml:{line}:25: cluster.time: 0 is out of range (minimum 1)"]


@pytest.mark.parametrize("args, message", [
    (["--slurm-partition", "gpu"], "--slurm-partition sets the resources of SLURM jobs: add --executor slurm"),
    (["--executor", "slurm", "--slurm-time", "0"], "--slurm-time must be at least 1, got 0"),
    (["--executor", "slurm", "--slurm-mem", "-1"], "--slurm-mem must be a positive number of GB, got -1"),
    (["--executor", "slurm", "--stack"], "--stack trains a configuration's seeds in one process"),
])
def test_bad_executor_flags_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    rc, _, err = main("run", spec, "--out", tmp_path / "out", "--no-progress", *args)
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_one_run_is_not_submitted(tmp_path, monkeypatch):
    monkeypatch.setenv(SUBMITIT_CLUSTER, "debug")
    spec = tmp_path / "one.yaml"
    spec.write_text(tiny_digits_vae("one"))
    rc, _, err = main("run", spec, "--out", tmp_path / "out", "--executor", "slurm")
    assert rc == 1 and "submits the runs of a study" in err and not (tmp_path / "out").exists()


def test_missing_submitit_is_a_clear_message(tmp_path, monkeypatch):
    from genspec.errors import RunError

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` fails, as where it is not installed
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    rc, _, err = main("run", spec, "--out", tmp_path / "out", "--executor", "slurm")
    assert rc == 1 and err == "genspec: --executor slurm needs submitit: pip install -e '.[slurm]'\n"
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunError, match=r"pip install -e '\.\[slurm\]'"):
        executor_from("slurm")
    assert executor_from("local") is None  # the local executor never needs it


def test_no_slurm_here_is_a_clear_message(tmp_path, monkeypatch):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine is a SLURM node")
    monkeypatch.delenv(SUBMITIT_CLUSTER, raising=False)
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    rc, _, err = main("run", spec, "--out", tmp_path / "out", "--no-progress", "--executor", "slurm")
    assert rc == 1 and "Traceback" not in err
    assert 'Could not detect "srun"' in err and f"{SUBMITIT_CLUSTER}=local" in err


def test_a_job_that_ends_without_a_result_says_why_and_where_its_log_is(tmp_path):
    """A job killed or crashed outside genspec (out of memory, a node failure): submitit's error
    holds the job's traceback, whose last line says what went wrong."""
    from genspec.experiments.cluster import _outcome

    class Crashed:
        job_id = "4242_1"
        paths = submitit.core.utils.JobPaths(tmp_path / "%j", job_id="4242_1")

        def result(self):
            raise submitit.core.utils.FailedJobError("Job (task=0) failed\nTraceback ...\nMemoryError: out of memory\n")

    result, problem = _outcome(Crashed())
    assert result is None
    assert problem == (f"job 4242_1 ended without a result (MemoryError: out of memory; "
                       f"log: {tmp_path / '4242_1' / '4242_1_0_log.err'})")
