"""Images from a model's generator: draws from it (with its conditions), interpolations, any
graph tensor from latent draws alone, and images scaled to [0, 1] for saving. Which network and
latents make an image of the data's shape is decided torch-free (genspec/graph/grids.py,
generator_of). Shared by the evaluation, the feature-based metrics, the label histogram,
balancing and `genspec sample`."""

from __future__ import annotations

import torch

from genspec.compiler.model import Env, Model
from genspec.graph.dependencies import compute_order
from genspec.lang.spec import Spec


def generator_parts(model_or_run, source: tuple) -> tuple:
    """(module, latent prior, condition priors) of a generator_of result."""
    priors = model_or_run.priors
    return model_or_run.networks[source[0]], priors[source[1]], [priors[c] for c in source[2]]


def graph_samples(spec: Spec, model: Model, tensor: str, n: int) -> torch.Tensor:
    """n values of a graph tensor computed from latent draws alone (no data), in eval mode."""
    nodes = [(node, model.node_fns[node]) for node in compute_order(spec.graph_nx, [f"tensor:{tensor}"])]
    batch = spec.evaluate["batch_size"]
    parts = []
    model.train(False)
    with torch.no_grad():
        for start in range(0, n, batch):
            size = min(batch, n - start)
            # the step's batch size comes from x; nothing reads it here
            env = model.compute(Env(torch.empty((size, 0), device=model.device)), nodes)
            parts.append(env[f"tensor:{tensor}"])
    model.train(True)
    return torch.cat(parts)


def to_unit(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Images in the spec's range -> [0, 1] for saving."""
    if list(spec.data.get("range", [0, 1])) == [-1, 1]:
        x = (x + 1) / 2
    return x.clamp(0, 1)


def sample_images(module, prior, n: int, device, conditions=()) -> torch.Tensor:
    return module(prior.sample(n, device), *[c.sample(n, device) for c in conditions])


def interpolation_images(module, prior, rows: int, steps: int, device, conditions=()) -> torch.Tensor:
    """Each row decodes a straight line in latent space between two prior draws (a conditional
    generator keeps one draw of its conditions along a row)."""
    shape = prior.shape
    ends = prior.sample(2 * rows, device).view(rows, 2, *shape)
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, *[1] * len(shape))
    z = ends[:, :1] * (1 - t) + ends[:, 1:] * t  # (rows, steps, *latent)
    fixed = [c.sample(rows, device).repeat_interleave(steps, dim=0) for c in conditions]
    return module(z.reshape(rows * steps, *shape), *fixed)


class FixedLabel:
    """A categorical condition drawn as one chosen class every time: `genspec sample --label K`
    makes a conditional generator draw only digit K."""

    def __init__(self, classes: int, label: int):
        self.shape, self.label = (classes,), label

    def sample(self, n: int, device) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((n,), self.label, device=device), self.shape[0]).float()


def with_label(conditions: list, label: int, latents: list[str]) -> list:
    """The generator's condition priors with its one categorical condition fixed to `label`.
    Raises ValueError, saying why, where there is no such condition or the class is out of range."""
    from genspec.compiler.priors import CategoricalPrior

    categorical = [i for i, c in enumerate(conditions) if isinstance(c, CategoricalPrior)]
    if len(categorical) != 1:
        raise ValueError("--label needs a generator with one categorical condition (a conditional GAN's "
                         f"labels); this one has {len(categorical)}")
    i = categorical[0]
    classes = conditions[i].shape[0]
    if not 0 <= label < classes:
        raise ValueError(f"--label {label}: the condition {latents[i]!r} has classes 0 to {classes - 1}")
    return [FixedLabel(classes, label) if j == i else c for j, c in enumerate(conditions)]
