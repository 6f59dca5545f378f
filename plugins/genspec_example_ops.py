"""An example genspec plugin: one layer op, one expression op, one prior and one training hook.

specs/zoo/plugin_example.yaml names it (`plugins: [genspec_example_ops]`); genspec finds it here,
in the project's plugins/ folder. tests/test_plugins.py checks each part against a hand computation.

    pixelnorm [eps]    a row: each example's features scaled to unit root-mean-square over the
                       channels, x / sqrt(mean_c x^2 + eps), at every pixel of a CxHxW input
                       (Karras et al. 2018, Progressive Growing of GANs, section 4.2); no parameters
    logcosh(a, b)      a loss: log(cosh(a - b)) summed over each example, mean over the batch:
                       (a - b)^2 / 2 near zero, |a - b| - log 2 far from it (robust to outliers)
    laplace(scale)     a prior: independent Laplace(0, scale) draws; kl(q, z) estimates the KL
                       divergence from its log-density
    max_norm hook      in a spec that names this plugin and sets params.max_norm = c: after every
                       optimiser step, the incoming weights of each unit (a row of an fc weight, a
                       filter of a conv) are rescaled to a norm of at most c (the max-norm
                       constraint of Srivastava et al. 2014, Dropout, section 5.1)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from genspec.plugins import AFTER_STEP, Hook, register_hook, register_layer, register_op, register_prior


# ---------------------------------------------------------------- pixelnorm: a layer op

class PixelNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def pixelnorm_shape(row: dict, in_shape: tuple) -> tuple:
    if len(in_shape) not in (1, 3):
        raise ValueError(f"normalises the channels of a flat or CxHxW input, got {'x'.join(map(str, in_shape))}")
    if row["eps"] <= 0:
        raise ValueError(f"eps must be positive, got {row['eps']:g}")
    return in_shape


register_layer("pixelnorm", shape=pixelnorm_shape, build=lambda row, in_shape, out_shape: PixelNorm(row["eps"]),
               options={"eps": 1e-8}, doc="x / sqrt(mean over channels of x^2 + eps), per example and pixel")


# ---------------------------------------------------------------- logcosh: an expression op

def logcosh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    per_element = d + F.softplus(-2 * d) - math.log(2)  # log(cosh(d)), without cosh overflowing
    return per_element.flatten(1).sum(1).mean()


register_op("logcosh", fn=logcosh, args=("tensor", "tensor"), result="scalar", same_shape=True,
            doc="log(cosh(a - b)) summed per example, mean over the batch")


# ---------------------------------------------------------------- laplace: a prior

class LaplacePrior(nn.Module):
    def __init__(self, shape: tuple, scale: float):
        super().__init__()
        self.shape, self.scale = tuple(shape), float(scale)

    def sample(self, n: int, device) -> torch.Tensor:
        # inverse CDF; u kept inside (-1, 1) so that log1p never meets -1
        u = torch.empty((n, *self.shape), device=device).uniform_(torch.finfo(torch.float32).eps - 1, 1)
        return -self.scale * u.sign() * torch.log1p(-u.abs())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (-z.abs() / self.scale - math.log(2 * self.scale)).flatten(1).sum(1)


def laplace_check(args: tuple, kwargs: dict) -> str | None:
    scale = args[0]
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < math.inf:
        return f"the scale must be a positive number, got {scale!r}"
    return None


register_prior("laplace", build=lambda latent: LaplacePrior(latent.shape, *latent.prior_args), params=("scale",),
               check=laplace_check, doc="independent Laplace(0, scale) draws")


# ---------------------------------------------------------------- max_norm: a training hook

@register_hook("genspec_example_ops.max_norm", order=AFTER_STEP)
class MaxNorm(Hook):
    def __init__(self, bound: float):
        self.bound = bound

    @classmethod
    def attach(cls, run):
        # once imported a hook hears every run of the process: only the specs that name this plugin
        if __name__ not in run.spec.plugins or "max_norm" not in run.spec.params:
            return None
        return cls(float(run.spec.params["max_norm"]))

    def after_update(self, run, phase, losses):
        updated = {net for objective in run.spec.phases[phase].update for net in run.spec.objectives[objective].networks}
        with torch.no_grad():
            for name in sorted(updated & set(run.model.networks)):
                for module in run.model.networks[name].modules():
                    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) \
                            and not nn.utils.parametrize.is_parametrized(module):
                        unit = 1 if isinstance(module, nn.ConvTranspose2d) else 0  # the output-unit dimension
                        module.weight.copy_(torch.renorm(module.weight, 2, unit, self.bound))

    def epoch_end(self, run, record):
        record["max_norm"] = self.bound
