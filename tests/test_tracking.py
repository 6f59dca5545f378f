"""Experiment tracking: what a run writes to TensorBoard and MLflow, read back with each library's
own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient), and that tracking never stops
a run."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from spec_helpers import QUICKSTART, TINY_BEGAN, TINY_CONDITIONAL_GAN, cli_in_process

SMALL = ["--set", "data.split={train: 128, test: 64}", "--no-progress"]


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(*args) -> str:
    rc, _, err = cli_in_process("run", *args)
    assert rc == 0, err
    return err


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    train(QUICKSTART, "--out", out, "--set", "train.epochs=2", *SMALL)
    return out


def test_every_epoch_loss_is_a_tensorboard_scalar(quickstart_run):
    accumulator, records = events(quickstart_run), history(quickstart_run)
    for part in ("train", "test"):
        for name in records[0][part]:
            tag = name if "/" in name else f"loss/{part}/{name}"  # objective/vae: an objective's mean, as it is
            got = scalars(accumulator, tag)
            assert [step for step, _ in got] == [1, 2]
            assert [value for _, value in got] == pytest.approx([r[part][name] for r in records], rel=1e-6)
    assert {"loss/train/elbo", "loss/test/elbo", "loss/test/kl", "objective/vae"} <= set(accumulator.Tags()["scalars"])
    assert [v for _, v in scalars(accumulator, "lr/vae")] == pytest.approx([1e-3, 1e-3])  # the quick-start's adam(lr)


def test_every_epoch_has_a_small_grid_of_each_kind(quickstart_run):
    accumulator = events(quickstart_run)
    assert set(accumulator.Tags()["images"]) == {"grids/samples", "grids/reconstructions", "grids/interpolations"}
    samples = accumulator.Images("grids/samples")
    assert [e.step for e in samples] == [1, 2]
    assert (samples[0].width, samples[0].height) == (4 * (8 + 2) + 2,) * 2  # 4 x 4 digits of 8 x 8, padding 2
    assert samples[0].encoded_image_string != samples[1].encoded_image_string  # the model moved between epochs


def test_final_metrics_and_params_are_hparams(quickstart_run):
    accumulator = events(quickstart_run)
    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    for name, value in metrics["test"].items():
        assert scalars(accumulator, f"final/{name}") == [(2, pytest.approx(value, rel=1e-6))]
    content = accumulator.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
    resolved = (quickstart_run / "spec.resolved.yaml").read_text()
    assert hparams["params.lr"] == pytest.approx(1e-3) and "lr: 0.001" in resolved
    assert hparams["train.epochs"] == 2 and hparams["train.seed"] == 0
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} >= {f"final/{name}" for name in metrics["test"]}


def test_a_traced_state_is_logged_per_epoch(tmp_path):
    (tmp_path / "began.yaml").write_text(TINY_BEGAN)
    train(tmp_path / "began.yaml", "--out", tmp_path / "run", "--no-progress")
    accumulator, records = events(tmp_path / "run"), history(tmp_path / "run")
    for name in ("k", "m_global"):  # began.yaml's train.trace
        for part in ("mean", "min", "max", "last"):
            tag = f"trace/{name}" if part == "mean" else f"trace/{name}/{part}"
            assert scalars(accumulator, tag) == [(r["epoch"], pytest.approx(r["trace"][name][part], rel=1e-6))
                                                 for r in records]
    assert records[-1]["trace"]["k"]["max"] > 0  # k moved: the test reads a live state, not its initial 0
    state = scalars(accumulator, "state/k")  # the state's epoch mean, as metrics.jsonl keeps it
    assert state == [(r["epoch"], pytest.approx(r["train"]["state/k"], rel=1e-6)) for r in records]
    assert [v for _, v in scalars(accumulator, "lr/dis")] == pytest.approx([1e-4, 1e-4])


def test_tracking_off_writes_nothing(tmp_path):
    text = TINY_CONDITIONAL_GAN.replace("train: {epochs: 1,", "train: {tracking: [], epochs: 1,")
    (tmp_path / "gan.yaml").write_text(text)
    train(tmp_path / "gan.yaml", "--out", tmp_path / "off", "--no-progress")
    assert (tmp_path / "off" / "metrics.json").exists()
    assert not (tmp_path / "off" / "tensorboard").exists() and not (tmp_path / "off" / "tracking.json").exists()
    # --tracking none on the command line does the same for a spec that tracks by default
    (tmp_path / "default.yaml").write_text(TINY_CONDITIONAL_GAN)
    train(tmp_path / "default.yaml", "--out", tmp_path / "none", "--tracking", "none", "--no-progress")
    assert not (tmp_path / "none" / "tensorboard").exists()


def test_a_misspelt_tracker_is_a_located_error(tmp_path):
    rc, _, err = cli_in_process("run", QUICKSTART, "--out", tmp_path / "run", "--tracking", "tensorboard,mlfow")
    assert rc == 2
    assert "train.tracking[1]: 'mlfow' is not one of \"tensorboard\", \"mlflow\"" in err
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_event_files(tmp_path):
    (tmp_path / "gan.yaml").write_text(TINY_CONDITIONAL_GAN)
    out = tmp_path / "run"
    train(tmp_path / "gan.yaml", "--out", out, "--no-progress")
    train(tmp_path / "gan.yaml", "--out", out, "--overwrite", "--set", "train.seed=1", "--no-progress")
    assert len(list((out / "tensorboard").iterdir())) == 1  # the old run's events went with it
    got = scalars(events(out), "loss/train/d_loss")
    assert got == [(1, pytest.approx(history(out)[0]["train"]["d_loss"], rel=1e-6))]


class StopAtEpoch2:
    """A hook that stops the run after epoch 2 was tracked and before it was checkpointed, as a
    kill there would (the checkpoint holds epoch 1)."""

    def __enter__(self):
        from genspec.errors import RunError
        from genspec.train.hooks import Hook, register_hook

        @register_hook("test_stop_at_epoch_2", order=99)
        class Stop(Hook):
            def epoch_end(self, run, record):
                if record["epoch"] == 2:
                    raise RunError("stopped for the test")

    def __exit__(self, *exc):
        from genspec.train.hooks import HOOKS

        HOOKS.pop("test_stop_at_epoch_2")


def test_resume_appends_to_the_same_runs_without_repeating_epochs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "gan.yaml").write_text(TINY_CONDITIONAL_GAN.replace("train: {epochs: 1,", "train: {epochs: 3,"))
    out = tmp_path / "run"
    with StopAtEpoch2():
        rc, _, err = cli_in_process("run", tmp_path / "gan.yaml", "--out", out, "--tracking", "tensorboard,mlflow",
                                    "--no-progress")
    assert "warning" not in err
    assert rc == 1 and "stopped for the test" in err
    assert [s for s, _ in scalars(events(out), "loss/train/d_loss")] == [1, 2]  # epoch 2 was logged, not checkpointed
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    time.sleep(1.1)  # event files are named by the second they start in: the resumed one sorts after
    # a resume may ask for more epochs: MLflow's write-once param keeps its first value, and a tag says the new one
    err = train(tmp_path / "gan.yaml", "--out", out, "--resume", "--set", "train.epochs=4", "--tracking",
                "tensorboard,mlflow", "--no-progress")
    assert "warning" not in err
    records = history(out)
    got = scalars(events(out), "loss/train/d_loss")
    assert got == [(r["epoch"], pytest.approx(r["train"]["d_loss"], rel=1e-6)) for r in records]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").iterdir())) == 2  # appended beside the first
    from mlflow import MlflowClient

    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "final/d_loss" in run.data.metrics
    assert run.data.params["train.epochs"] == "3" and run.data.tags["genspec.resumed_with.train.epochs"] == "4"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "loss/train/d_loss")] == [1, 2, 2, 3, 4]


def test_mlflow_records_params_metrics_and_artifacts(tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    train(QUICKSTART, "--out", out, "--set", "train.epochs=2", "--tracking", "tensorboard,mlflow", *SMALL)
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["params.lr"] == "0.001" and run.data.params["train.epochs"] == "2"
    records = history(out)
    for part in ("train", "test"):
        for name in records[0][part]:
            logged = client.get_metric_history(run.info.run_id, name if "/" in name else f"loss/{part}/{name}")
            assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == \
                [(r["epoch"], pytest.approx(r[part][name], rel=1e-9)) for r in records]
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["final/elbo"] == pytest.approx(metrics["test"]["elbo"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.resolved.yaml", "report.md", "metrics.jsonl", "samples.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "spec.resolved.yaml", str(tmp_path)))
    assert local.read_text() == (out / "spec.resolved.yaml").read_text()
    assert "images" in artifacts  # the per-epoch grids, as MLflow's log_image keeps them
    assert (out / "tensorboard").is_dir()  # both trackers at once


def test_the_default_mlflow_store_is_mlruns_in_the_working_folder(tmp_path, monkeypatch):
    from genspec.report.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # restored after the test, whatever tracking_uri sets
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == (tmp_path / "mlruns").as_uri()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri() == "http://tracking.example:5000"


def test_failing_trackers_are_one_warning_each_and_the_run_finishes(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    def refuse(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", refuse)
    monkeypatch.setattr(MlflowClient, "log_batch", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "gan.yaml").write_text(TINY_CONDITIONAL_GAN.replace("train: {epochs: 1,", "train: {epochs: 2,"))
    err = train(tmp_path / "gan.yaml", "--out", tmp_path / "run", "--tracking", "tensorboard,mlflow", "--no-progress")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        "genspec: warning: mlflow tracking failed (OSError: No space left on device); the run goes on without it",
        "genspec: warning: tensorboard tracking failed (OSError: No space left on device); the run goes on without it"]
    assert len(history(tmp_path / "run")) == 2 and (tmp_path / "run" / "metrics.json").exists()


def test_a_tracker_that_cannot_start_is_a_warning(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def unwritable(self, log_dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", log_dir)

    monkeypatch.setattr(SummaryWriter, "__init__", unwritable)
    (tmp_path / "gan.yaml").write_text(TINY_CONDITIONAL_GAN)
    out = tmp_path / "run"
    err = train(tmp_path / "gan.yaml", "--out", out, "--no-progress")
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"genspec: warning: tensorboard tracking failed (PermissionError: [Errno 13] Permission denied: "
        f"'{out / 'tensorboard'}'); the run goes on without it"]
    assert (out / "metrics.json").exists()


def test_mlflow_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError, as without the package
    (tmp_path / "gan.yaml").write_text(TINY_CONDITIONAL_GAN)
    err = train(tmp_path / "gan.yaml", "--out", tmp_path / "run", "--tracking", "mlflow", "--no-progress")
    assert ("genspec: warning: train.tracking names mlflow, but mlflow is not installed (pip install -e '.[mlflow]'); "
            "the run goes on without it") in err.splitlines()
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_study_logs_one_run_per_configuration_and_seed(tmp_path):
    study = TINY_CONDITIONAL_GAN.replace("name: tiny_cgan", "name: tiny_cgan_study\nrepeats: 2")
    (tmp_path / "study.yaml").write_text(study)
    for how in ("--no-stack", "--stack"):  # one run at a time, and the seeds as one stacked model
        out = tmp_path / how.strip("-")
        train(tmp_path / "study.yaml", "--out", out, how)
        values = []
        for seed in (0, 1):
            folder = out / "run" / f"seed{seed}"
            accumulator = events(folder)
            got = scalars(accumulator, "loss/test/d_loss")
            assert got == [(1, pytest.approx(history(folder)[0]["test"]["d_loss"], rel=1e-6))]
            assert accumulator.Tags()["scalars"].count("final/d_loss") == 1
            values.append(got[0][1])
        assert values[0] != values[1]  # each seed its own run


def test_tune_logs_each_trials_objective(tmp_path):
    out = tmp_path / "tune"
    rc, _, err = cli_in_process("tune", QUICKSTART, "--param", "beta", "--range", "0.5", "2", "--trials", 2, "--initial", 2,
                                "--metric", "elbo", "--set", "train.epochs=1", *SMALL, "--out", out)
    assert rc == 0, err
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    got = scalars(events(out), "tune/objective")
    assert got == [(int(r["trial"]), pytest.approx(float(r["value"]), rel=1e-6)) for r in rows]
    for r in rows:  # each trial is a run of its own, with the tuned param among its hparams
        assert scalars(events(out / r["folder"]), "final/elbo")[0][1] == pytest.approx(float(r["value"]), rel=1e-6)
