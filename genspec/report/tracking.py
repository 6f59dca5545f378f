"""Experiment tracking: each run's numbers and pictures in TensorBoard (by default) and MLflow.

`train.tracking` names the trackers (default [tensorboard]; [] turns tracking off;
`genspec run --tracking tensorboard,mlflow` on the command line). Per epoch a run logs what its
record in metrics.jsonl holds, under TensorBoard's usual tags:

    loss/train/NAME, loss/test/NAME   each loss's epoch mean (train) and test-set mean
    state/NAME                        a state's epoch mean (BEGAN's k)
    trace/NAME (/min /max /last)      a traced loss or state's summary of the epoch's steps
    lr/OBJECTIVE                      each optimiser's learning rate
    time/epoch_s                      the epoch's seconds
    grids/KIND                        a small grid (4 x 4) of samples, reconstructions, interpolations

and at its end final/NAME for every final number (test losses, IS/FID/KID, accuracy), with the
spec's params as hyperparameters (TensorBoard's HParams table; MLflow params) and, in MLflow,
the resolved spec, the report and its pictures as artifacts. The step is the epoch.

TensorBoard writes `RUN/tensorboard/`; a resumed run appends there, purging what epochs it redoes
(SummaryWriter's purge_step, which TensorBoard honours on reading). MLflow logs to
MLFLOW_TRACKING_URI, or without it to a local file store `./mlruns` (`mlflow ui` shows it); the
run's id is kept in RUN/tracking.json so that a resume continues the same MLflow run. mlflow is
an optional extra (`pip install -e '.[mlflow]'`), imported only when asked for.

Tracking never stops a run: a tracker that cannot start or fails later (an unwritable folder, a
server that went away) is one warning line on stderr, and the run goes on without it. Nothing is
logged per step, and the epoch grids come from a forked random stream, so a tracked run trains
bit for bit as an untracked one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from genspec.lang.spec import Spec
from genspec.measure.evaluate import grid_images
from genspec.report.run_report import flat_results
from genspec.train.folder import RESOLVED, TENSORBOARD_DIR, TRACKING_FILE, atomic_write_text
from genspec.train.hooks import TRACKING, Hook, register_hook

EPOCH_GRID_SIDE = 4  # 16 images a grid per epoch: enough to watch, cheap to draw
MISSING = {"tensorboard": "pip install tensorboard", "mlflow": "pip install -e '.[mlflow]'"}


class Tracker:
    """What a tracking backend does; each one maps these onto its library's conventions."""

    name = ""

    def params(self, params: dict) -> None: ...
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def images(self, grids: dict, step: int) -> None: ...  # tag -> (CHW tensor in [0, 1])
    def final(self, metrics: dict[str, float], step: int) -> None: ...
    def artifacts(self, paths: list[Path]) -> None: ...
    def close(self) -> None: ...


class TensorBoard(Tracker):
    """Event files in one folder, through torch.utils.tensorboard's SummaryWriter."""

    name = "tensorboard"

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self.hparams: dict = {}

    def params(self, params: dict) -> None:
        self.hparams = params  # written with the final metrics, as TensorBoard's HParams table pairs them

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # per epoch: a killed run keeps what it logged

    def images(self, grids: dict, step: int) -> None:
        for tag, image in grids.items():
            self.writer.add_image(tag, image, step)
        self.writer.flush()

    def final(self, metrics: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        if self.hparams:
            # into this run's own event file (SummaryWriter.add_hparams would start a sub-run)
            for summary in hparams(self.hparams, {tag: None for tag in metrics}):
                self.writer.file_writer.add_summary(summary, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow(Tracker):
    """One MLflow run per genspec run (experiment: the spec's name), through MlflowClient."""

    name = "mlflow"

    def __init__(self, experiment: str, out: Path, resumed: bool):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self.Metric, self.Param = Metric, Param
        uri = tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        previous = _read_tracking_file(out).get("mlflow", {}) if resumed else {}
        if previous.get("uri") == uri and previous.get("run_id"):
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=_run_name(out),
                                         tags={"genspec.folder": str(out.resolve())})
            self.run_id = run.info.run_id
            atomic_write_text(out / TRACKING_FILE, json.dumps({"mlflow": {"uri": uri, "run_id": self.run_id}}) + "\n")

    def params(self, params: dict) -> None:
        """MLflow params are write-once: a resume that changed one (--set train.epochs=20, which
        a resume may change) keeps the first value and tags the run with the new one."""
        logged = self.client.get_run(self.run_id).data.params
        new = {k: str(v) for k, v in params.items() if k not in logged}
        for key, value in params.items():
            if key in logged and logged[key] != str(value):
                self.client.set_tag(self.run_id, f"genspec.resumed_with.{key}", str(value))
        if new:
            self.client.log_batch(self.run_id, params=[self.Param(k, v) for k, v in new.items()])

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def images(self, grids: dict, step: int) -> None:
        for tag, image in grids.items():  # MLflow's per-step images (its UI has a slider over the steps)
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            self.client.log_image(self.run_id, array, key=tag, step=step)

    def final(self, metrics: dict[str, float], step: int) -> None:
        self.scalars(metrics, step)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a file store in ./mlruns (MLflow's own default, sqlite, needs
    SQLAlchemy, which mlflow-skinny leaves out). MLflow 3 refuses a file store unless asked for
    it: choosing one here (or in MLFLOW_TRACKING_URI) is asking, unless MLFLOW_ALLOW_FILE_STORE says no."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _run_name(out: Path) -> str:
    """The folder as the user named it (reports/vae/lr=0.1/seed0): unique, and it says where the run is."""
    try:
        return str(out.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(out)


def _read_tracking_file(out: Path) -> dict:
    try:
        found = json.loads((out / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


class Tracking:
    """The trackers a run logs to, each call guarded: a tracker that raises is named in one
    warning line and dropped, and the run goes on."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.grids = True  # False once drawing the epoch grids failed: said once, then not tried again

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def call(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - whatever a tracker raises, training goes on
                self.drop(tracker.name, exc)
                self.trackers.remove(tracker)

    @staticmethod
    def drop(name: str, exc: BaseException) -> None:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(f"genspec: warning: {name} tracking failed ({type(exc).__name__}{': ' + text if text else ''}); "
              "the run goes on without it", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.call("close")
        self.trackers = []


def open_tracking(names, out: Path, experiment: str, resumed: bool = False, purge_step: int | None = None) -> Tracking:
    """The trackers `names` asks for, logging for the run (or tuning) in `out`. One that cannot
    start (its package missing, its folder unwritable) is a warning line, not an error."""
    trackers = []
    for name in names:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoard(out / TENSORBOARD_DIR, purge_step))
            elif name == "mlflow":
                trackers.append(MLflow(experiment, out, resumed))
        except ImportError as exc:
            package = (exc.name or name).split(".")[0]
            print(f"genspec: warning: train.tracking names {name}, but {package} is not installed "
                  f"({MISSING.get(name, 'pip install ' + package)}); the run goes on without it", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - a tracker that cannot start does not stop the run
            Tracking.drop(name, exc)
    return Tracking(trackers)


# ---------------------------------------------------------------- what a run logs


def run_params(spec: Spec) -> dict:
    """The hyperparameters of a run: the spec's params (what `tune` and sweeps vary) and the
    training settings that tell runs of one spec apart."""
    params = {f"params.{k}": _param_value(v) for k, v in spec.params.items()}
    params.update({f"train.{k}": spec.train[k] for k in ("seed", "epochs", "batch_size")})
    return params


def _param_value(value):
    """A value TensorBoard's HParams accepts (a number, string or bool); others as text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def epoch_scalars(record: dict, learning_rates: dict[str, float]) -> dict[str, float]:
    """An epoch's record (as metrics.jsonl holds it) as tags -> values."""
    values = {}
    for name, value in record.get("train", {}).items():
        values[name if "/" in name else f"loss/train/{name}"] = value  # state/NAME as it is
    values.update({f"loss/test/{name}": value for name, value in record.get("test", {}).items()})
    for name, summary in record.get("trace", {}).items():
        values[f"trace/{name}"] = summary["mean"]
        values.update({f"trace/{name}/{part}": summary[part] for part in ("min", "max", "last")})
    values.update({f"lr/{name}": lr for name, lr in learning_rates.items()})
    if "time_s" in record:
        values["time/epoch_s"] = record["time_s"]
    return {tag: float(v) for tag, v in values.items() if isinstance(v, (int, float))}


def learning_rates(model) -> dict[str, float]:
    """Each objective's current learning rate (its optimiser's first parameter group)."""
    return {name: float(objective.optimizer.param_groups[0]["lr"]) for name, objective in model.objectives.items()}


def final_scalars(metrics: dict) -> dict[str, float]:
    return {f"final/{name}": float(value) for name, value in flat_results(metrics).items()
            if isinstance(value, (int, float)) and math.isfinite(value)}


def epoch_grids(spec: Spec, model, test) -> dict:
    """grids/KIND -> a small grid image (CHW in [0, 1]) of each of the spec's grids."""
    from torchvision.utils import make_grid

    return {f"grids/{kind}": make_grid(images, nrow=nrow, padding=2, pad_value=0.5)
            for kind, (images, nrow) in grid_images(spec, model, test, EPOCH_GRID_SIDE).items()}


def log_epoch(tracking: Tracking, spec: Spec, model, test, record: dict) -> None:
    if not tracking:
        return
    epoch = record["epoch"]
    tracking.call("scalars", epoch_scalars(record, learning_rates(model)), epoch)
    if not tracking.grids:
        return
    try:
        grids = epoch_grids(spec, model, test)
    except Exception as exc:  # noqa: BLE001 - a picture that cannot be made is not worth the run
        model.train(True)
        tracking.grids = False
        tracking.drop("epoch grid", exc)
        return
    if grids:
        tracking.call("images", grids, epoch)


def log_end(tracking: Tracking, out: Path, metrics: dict, epochs: int) -> None:
    """The final metrics, the run's files as artifacts, and the trackers closed."""
    if not tracking:
        return
    tracking.call("final", final_scalars(metrics), epochs)
    files = [RESOLVED, "report.md", "layers.md", "metrics.jsonl", "losses.png", "graph.png", "trace.png", "trace.csv",
             "labels.png", *metrics.get("grids", {}).values()]
    tracking.call("artifacts", [out / f for f in files if (out / f).is_file()])
    tracking.close()


def start_tracking(spec: Spec, out: Path, resumed: bool, start_epoch: int) -> Tracking:
    """A run's trackers, its params logged. A resumed run appends, from `start_epoch` on."""
    tracking = open_tracking(spec.train.get("tracking", ()), out, spec.name, resumed,
                             purge_step=start_epoch if resumed else None)
    tracking.call("params", run_params(spec))
    return tracking


@register_hook("tracking", order=TRACKING)
class TrackingHook(Hook):
    """`train.tracking`: every epoch's record (and a small grid) to the trackers, the final
    metrics and the report at the end; on the main process, and nothing per step."""

    def __init__(self):
        self.tracking = Tracking([])

    @classmethod
    def attach(cls, run):
        return cls() if run.world.main and run.spec.train.get("tracking") else None

    def run_start(self, run) -> None:  # after the folder is cleared (or restored): nothing is written before
        self.tracking = start_tracking(run.spec, run.out, run.resumed, run.start_epoch)

    def epoch_end(self, run, record: dict) -> None:
        log_epoch(self.tracking, run.spec, run.model, run.splits.test, record)

    def run_end(self, run) -> None:
        log_end(self.tracking, run.out, run.metrics, run.epochs)
