"""CGAN-MBL's mean-covariance balancing labelling (Li, He and Li 2019, as the coursework uses it).

Each class of the real data gets a mean and a covariance in a feature space (pixels, or the
penultimate layer of a genspec classifier run). Generated images are labelled by the class
whose mean is nearest in Mahalanobis distance; classes that receive few images (the minority)
then get a larger share of the generator's label draws, so the generated classes even out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genspec.compiler import distributed as dist
from genspec.errors import RunError
from genspec.train.hooks import BALANCING, Hook, register_hook


@dataclass
class ClassStatistics:
    means: torch.Tensor  # (K, D)
    whiteners: torch.Tensor  # (K, D, D): inverse Cholesky factors of the covariances


def class_statistics(features: torch.Tensor, labels: torch.Tensor, classes: int, shrinkage: float) -> ClassStatistics:
    """Per-class means and covariances. Each covariance is shrunk towards its average variance
    (cov + s * mean(diag) * I), which keeps it invertible when features are constant (MNIST's
    border pixels) or outnumber the examples."""
    features = features.double()
    dim = features.shape[1]
    pooled = torch.cov(features.T).reshape(dim, dim)
    means, whiteners = [], []
    for k in range(classes):
        members = features[labels == k]
        if len(members) == 0:
            raise RunError(f"train.balance: class {k} has no real example in the training split, so it has no mean")
        mean = members.mean(0)
        centred = members - mean
        # a class seen once has no covariance of its own: it borrows the pooled one
        cov = centred.T @ centred / (len(members) - 1) if len(members) > 1 else pooled
        scale = cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + shrinkage * scale * torch.eye(dim, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov)
        whiteners.append(torch.linalg.solve_triangular(chol, torch.eye(dim, dtype=cov.dtype, device=cov.device), upper=False))
        means.append(mean)
    return ClassStatistics(torch.stack(means), torch.stack(whiteners))


def mahalanobis(features: torch.Tensor, stats: ClassStatistics) -> torch.Tensor:
    """(N, K) Mahalanobis distances of each feature row to each class mean."""
    features = features.double()
    distances = []
    for mean, whitener in zip(stats.means, stats.whiteners):
        distances.append(((features - mean) @ whitener.T).norm(dim=1))  # ||L^-1 (f - mu)||
    return torch.stack(distances, dim=1)


def assign_labels(features: torch.Tensor, stats: ClassStatistics) -> torch.Tensor:
    """The class with the smallest Mahalanobis distance, per row."""
    return mahalanobis(features, stats).argmin(dim=1)


def rebalanced_weights(counts: torch.Tensor, mix: float = 0.5) -> torch.Tensor:
    """Label-sampling weights that favour the minority: inversely proportional to each class's
    share of the labelled images (add-one smoothed), mixed with the uniform distribution. Set
    afresh from each labelling rather than compounded across them, so a class the generator
    has abandoned keeps at least (1 - mix) / K of the draws and can come back. Balanced counts
    give uniform weights."""
    counts = counts.double()
    inverse = 1.0 / (counts + 1)
    uniform = torch.full_like(inverse, 1.0 / len(counts))
    return (1 - mix) * uniform + mix * inverse / inverse.sum()


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def classifier_features(run_dir: str):
    """A function images -> penultimate-layer features of a genspec classifier run (the same
    layer the FID extractor reads)."""
    from genspec.measure.fidelity import _penultimate_row
    from genspec.train.finished import load_run

    run = load_run(run_dir)
    name = next(iter(run.networks))
    net = run.networks[name]
    row = _penultimate_row(run.spec.networks[name])

    def features(images: torch.Tensor) -> torch.Tensor:
        net.to(images.device).eval()
        with torch.no_grad():
            h = images
            kept: dict = {}  # the outputs that skip rows read
            for i in range(len(net.rows)):
                h = net.rows.step(i, h, kept)
                if i == row:
                    return net.rows.output_of(i, h).flatten(1)
        return h.flatten(1)

    return features


class Balancer:
    """The training loop's hook: labels generated images and reweights the categorical prior."""

    def __init__(self, spec, model, train_split):
        options = spec.train["balance"]
        self.options = options
        self.prior = model.priors[options["latent"]]
        self.classes = self.prior.shape[0]
        self.features = (pixel_features if options["features"] == "pixels"
                         else classifier_features(options["features"]["classifier"]))
        real = self.features(train_split.images())
        self.stats = class_statistics(real, train_split.y, self.classes, options["shrinkage"])

    def due(self, epoch: int) -> bool:
        return epoch % self.options["every"] == 0

    def step(self, generate) -> dict:
        """generate(n) -> images drawn with the current label weights. Returns what to log."""
        images = generate(self.options["samples"])
        labels = assign_labels(self.features(images), self.stats)
        counts = torch.bincount(labels, minlength=self.classes)
        self.prior.weights.copy_(rebalanced_weights(counts).to(self.prior.weights))
        return {"counts": counts.tolist(), "weights": [round(w, 5) for w in self.prior.weights.tolist()]}


@register_hook("balance", order=BALANCING)
class BalanceHook(Hook):
    """`train.balance`: every `every` epochs, label the generator's images and reweight its label
    prior (on every process; rank 0's weights then go to all), logged in the epoch's record."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    @classmethod
    def attach(cls, run):
        return cls(Balancer(run.spec, run.model, run.splits.train)) if run.spec.train.get("balance") else None

    def epoch_end(self, run, record: dict) -> None:
        if not self.balancer.due(record["epoch"]):
            return
        from genspec.measure.sampling import graph_samples

        spec, model = run.spec, run.model
        record["balance"] = self.balancer.step(lambda n: graph_samples(spec, model, spec.train["balance"]["images"], n))
        if run.world.distributed:
            dist.broadcast_module_state([model.priors])  # rank 0's label weights for every rank
