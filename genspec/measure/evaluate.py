"""Stage 7: test-set averages of the losses, and the image grids (samples, reconstructions,
interpolations).

Evaluation draws its randomness from a fixed seed inside `torch.random.fork_rng`, so it
never shifts the training stream (resume stays exact) and epochs are compared on the same
draws.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from genspec.compiler import distributed as dist
from genspec.compiler.model import Env, Model
from genspec.data.datasets import Split, Splits, batches
from genspec.errors import RunError
from genspec.graph import grids
from genspec.graph.dependencies import compute_order
from genspec.graph.grids import generator_of
from genspec.lang.spec import Spec
from genspec.measure import fidelity, labels, provenance
from genspec.measure.sampling import generator_parts, interpolation_images, sample_images, to_unit
from genspec.train.hooks import EVALUATION, Hook, register_hook
from genspec.train.trace import collapse_flags

EVAL_SEED = 12345


def forked_rng(model: Model):
    devices = [model.device] if model.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def evaluated_losses(spec: Spec, model: Model) -> tuple[list[str], list]:
    """The losses `evaluate.losses` names (default: all) and the nodes that compute them, in order."""
    names = spec.evaluate.get("losses", list(spec.losses))
    return names, [(n, model.node_fns[n]) for n in compute_order(spec.graph_nx, [f"loss:{name}" for name in names])]


def evaluate_losses(spec: Spec, model: Model, split: Split) -> dict:
    """Mean of each evaluated loss over a split, in eval mode."""
    names, nodes = evaluated_losses(spec, model)
    if not names or len(split) == 0:
        return {}
    sums = {name: 0.0 for name in names}
    count = 0
    model.train(False)
    with forked_rng(model), torch.no_grad():
        torch.manual_seed(EVAL_SEED)
        for x, y in batches(split, spec.evaluate["batch_size"], None, training=False):
            env = model.compute(Env(x, y), nodes)
            for name in names:  # summed on the device in float64, read back once at the end
                sums[name] = sums[name] + torch.as_tensor(env[f"loss:{name}"]).double() * len(x)
            count += len(x)
    model.train(True)
    return {name: float(total) / count for name, total in sums.items()}


# ---------------------------------------------------------------- grids


def grid_sources(spec: Spec) -> dict:
    """What each requested grid shows, as genspec/graph/grids.py decides it; validation refuses a
    grid with no source, so only a spec that skipped the graph check meets the RunError."""
    sources = grids.grid_sources(spec, spec.graph_nx)
    missing = [kind for kind, source in sources.items() if source is None]
    if missing:
        raise RunError(f"evaluate.grids: {grids.missing_source(spec, spec.graph_nx, missing[0])}")
    return sources


def make_grids(spec: Spec, model: Model, test: Split, out: Path) -> dict[str, str]:
    from torchvision.utils import save_image

    written = {}
    for kind, (images, nrow) in grid_images(spec, model, test, spec.evaluate["grid_size"]).items():
        path = out / f"{kind}.png"
        save_image(images, path, nrow=nrow, padding=2, pad_value=0.5)
        written[kind] = path.name
    return written


def grid_images(spec: Spec, model: Model, test: Split, side: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Each requested grid's images (on the CPU, in [0, 1]) and its row length, `side` images a
    row: drawn in eval mode from EVAL_SEED inside a forked RNG, so making them (at the end, or
    every epoch for the trackers) leaves training's random streams where they were."""
    grids = {}
    model.train(False)
    with forked_rng(model), torch.no_grad():
        torch.manual_seed(EVAL_SEED)
        for kind, source in grid_sources(spec).items():
            images, nrow = _grid_images(spec, model, test, kind, source, side)
            grids[kind] = (to_unit(images.float().cpu(), spec), nrow)
    model.train(True)
    return grids


def _grid_images(spec: Spec, model: Model, test: Split, kind: str, source: tuple, side: int):
    device = model.device
    if source[0] == "generator":
        module, prior, conditions = generator_parts(model, source[1:])
        if kind == "samples":
            return sample_images(module, prior, side * side, device, conditions), side
        steps = spec.evaluate["interpolation_steps"]
        rows = spec.evaluate.get("interpolation_rows", side)
        return interpolation_images(module, prior, rows, steps, device, conditions), steps
    name = source[1]
    default = (side + side % 2) * side // 2 if kind == "reconstructions" else side * side
    n = min(spec.evaluate.get("reconstruction_images", default) if kind == "reconstructions" else default, len(test))
    x = test.images(slice(n))
    y = None if test.y is None else test.y[:n]
    order = compute_order(spec.graph_nx, [f"tensor:{name}"])
    env = model.compute(Env(x, y), [(n_, model.node_fns[n_]) for n_ in order])
    images = env[f"tensor:{name}"]
    if kind == "reconstructions":
        # originals and reconstructions in alternating columns (an even number of them)
        pairs = torch.stack([x, images], dim=1).reshape(2 * n, *x.shape[1:])
        return pairs, min(side + side % 2, 2 * n)
    return images, side


def final_evaluation(spec: Spec, model: Model, splits: Splits, out: Path, history: list, progress: bool = False) -> dict:
    began = time.perf_counter()
    metrics = {
        "name": spec.name,
        "epochs": spec.train["epochs"],
        "seed": spec.train["seed"],
        "device": str(model.device),
        "test": evaluate_losses(spec, model, splits.test),
        "train_last_epoch": history[-1]["train"] if history else {},
        **best_test_losses(history),
        "time_per_epoch_s": sum(h["time_s"] for h in history) / len(history) if history else None,
        "train_time_s": round(sum(h["time_s"] for h in history), 3),  # every epoch, across resumes
        "commit": provenance.commit(Path(__file__).parent),
        "hardware": provenance.hardware(model.device),
        "params": {**{name: {"trainable": net.info.trainable, "frozen": net.info.frozen} for name, net in spec.networks.items()},
                   **{f"prior:{name}": {"trainable": sum(p.numel() for p in prior.parameters()), "frozen": 0}
                      for name, prior in model.priors.items() if any(True for _ in prior.parameters())}},
        "data": {"dataset": spec.data["dataset"], "train": len(splits.train), "test": len(splits.test),
                 "val": len(splits.val) if splits.val else 0, "notes": splits.notes},
    }
    metrics["grids"] = make_grids(spec, model, splits.test, out)
    with forked_rng(model):
        torch.manual_seed(EVAL_SEED + 1)
        found = labels.sample_labels(spec, model)
    if found is not None:
        metrics["sample_labels"] = found
    collapse = spec.evaluate.get("collapse")
    if collapse:
        metrics["collapse"] = {"state": collapse["state"], "fall": collapse["fall"], "window": collapse["window"],
                               "flags": collapse_flags(history, collapse["state"], collapse["fall"], collapse["window"])}
    if history and "balance" in history[-1]:
        metrics["balance"] = history[-1]["balance"]
    if spec.evaluate.get("accuracy"):
        metrics["test_accuracy"] = accuracy(spec, model, splits.test)
    if fidelity.requested(spec.evaluate):
        metrics.update(_sample_quality(spec, model, splits, progress))
    if spec.evaluate.get("real"):
        metrics["real"] = _real_metrics(spec, model, splits, out)
    metrics["eval_time_s"] = round(time.perf_counter() - began, 3)
    return metrics


def best_test_losses(history: list) -> dict:
    """Each test loss's lowest value over the epochs, and the epoch it came at: what a paper that
    keeps the best checkpoint reports (BEGAN v3's optimal M_global)."""
    best, epoch = {}, {}
    for record in history:
        for name, value in record.get("test", {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value) and (name not in best or value < best[name]):
                best[name], epoch[name] = value, record["epoch"]
    return {"best_test": best, "best_test_epoch": epoch}


def accuracy(spec: Spec, model: Model, split: Split) -> float:
    """Share of test examples whose argmax of the `evaluate.accuracy` tensor equals the label."""
    if split.y is None:
        raise RunError("evaluate.accuracy needs class labels (data.labels: true)")
    name = f"tensor:{spec.evaluate['accuracy']}"
    nodes = [(n, model.node_fns[n]) for n in compute_order(spec.graph_nx, [name])]
    correct = 0
    model.train(False)
    with forked_rng(model), torch.no_grad():
        for x, y in batches(split, spec.evaluate["batch_size"], None, training=False):
            correct = correct + (model.compute(Env(x, y), nodes)[name].argmax(1) == y).sum()  # read back once
    model.train(True)
    return int(correct) / len(split)


def _reference_images(spec: Spec, splits: Splits) -> torch.Tensor:
    reference = spec.evaluate.get("reference", {})
    split = splits.train if reference.get("split", "test") == "train" else splits.test
    return split.images(slice(reference.get("size", len(split))))


def _sample_quality(spec: Spec, model: Model, splits: Splits, progress: bool) -> dict:
    source = generator_of(spec)
    if source is None:
        raise RunError("evaluate asks for sample metrics, but no network maps a latent to the data shape")
    module, prior, conditions = generator_parts(model, source)
    batch = spec.evaluate["batch_size"]

    def generate(n: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([sample_images(module, prior, min(batch, n - i), model.device, conditions)
                              for i in range(0, n, batch)])

    model.train(False)
    with forked_rng(model):
        torch.manual_seed(EVAL_SEED)
        result = fidelity.sample_metrics(spec, model, generate, _reference_images(spec, splits), model.device, progress)
    model.train(True)
    return {"fidelity": result["metrics"], "protocol": result["protocol"], "fidelity_notes": result["notes"]}


def _real_metrics(spec: Spec, model: Model, splits: Splits, out: Path) -> dict:
    """A classifier run scores real images in its own feature space (IS of real MNIST): the test
    split's, or the training split's with `real.split: train`."""
    # The extractor is loaded from the finished run's checkpoint: the training loop (train/loop.py's or
    # stack.py's) wrote it after the last epoch, under --nproc with every rank's random streams
    asked = dict(spec.evaluate["real"])
    split = asked.pop("split", "test")
    images = getattr(splits, split).images()
    real = {m: {"samples": len(images), **options} for m, options in asked.items()}
    spec_like = _SpecView(spec, {"batch_size": spec.evaluate["batch_size"], **real, "extractor": {"classifier": str(out)}})
    result = fidelity.sample_metrics(spec_like, model, lambda n: images[:n], images, model.device)
    return {**result["metrics"], "protocol": {**result["protocol"], "split": split}, "notes": result["notes"]}


class _SpecView:
    """The spec with another evaluate section (for scoring the real data)."""

    def __init__(self, spec: Spec, evaluate: dict):
        self.data, self.evaluate = spec.data, evaluate


__all__ = ["evaluate_losses", "final_evaluation", "grid_sources", "RunError"]


@register_hook("evaluation", order=EVALUATION)
class EvaluationHook(Hook):
    """The test losses after every epoch (a run whose test loss is not finite stops, every process
    together), and the final evaluation (losses, samples and grids, FID/IS/KID, the label
    histogram) into `run.metrics` at the end."""

    @staticmethod
    def preflight(spec) -> None:
        fidelity.preflight(spec.evaluate)  # the feature extractor's weights
        grid_sources(spec)

    def epoch_end(self, run, record: dict) -> None:
        problem = None
        if run.world.main:  # rank 0 evaluates and writes; a stop there stops every rank
            record["test"] = test = evaluate_losses(run.spec, run.model, run.splits.test)
            bad = [name for name, value in test.items() if not math.isfinite(value)]
            if bad:
                problem = RunError(f"test loss {bad[0]!r} is {test[bad[0]]} after epoch {record['epoch']}; the run "
                                   "stopped (the last checkpoint is kept). Try a smaller learning rate.")
        dist.agree(problem, run.world)

    def run_end(self, run) -> None:
        run.metrics = final_evaluation(run.spec, run.model, run.splits, run.out, run.history,
                                       run.progress and sys.stderr.isatty())
