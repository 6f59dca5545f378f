"""Latent priors as modules: standard normal, uniform, categorical, a RealNVP flow and a VQ-VAE
codebook (both trainable).

Every prior gives `sample(n)` and `log_prob(z)` (summed over the latent's dimensions). A flow
maps a latent z to base noise u = f(z) through affine couplings; its density is
log N(u; 0, I) + log|det df/dz|, and sampling runs the inverse. A latent of several dimensions
(a conv grid such as 4x2x2) is flattened for the flow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genspec.lang import plugins
from genspec.lang.spec import Latent

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * (u.pow(2) + _LOG_2PI).flatten(1).sum(1)


class NormalPrior(nn.Module):
    def __init__(self, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)

    def sample(self, n: int, device) -> torch.Tensor:
        return torch.randn((n, *self.shape), device=device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)


class UniformPrior(nn.Module):
    def __init__(self, shape: tuple, low: float, high: float):
        super().__init__()
        self.shape, self.low, self.high = tuple(shape), low, high

    def sample(self, n: int, device) -> torch.Tensor:
        return torch.rand((n, *self.shape), device=device) * (self.high - self.low) + self.low

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        inside = ((z >= self.low) & (z <= self.high)).flatten(1).all(1)
        density = -math.prod(self.shape) * math.log(self.high - self.low)
        return torch.where(inside, torch.full_like(inside, density, dtype=z.dtype), torch.full_like(inside, -math.inf, dtype=z.dtype))


def _coupling_net(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """Three linear layers, LeakyReLU after the first two, Tanh last (the thesis's s and t nets)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, n_out), nn.Tanh())


class RealNVPPrior(nn.Module):
    """A RealNVP flow prior: `flows` affine couplings, halves swapped between them."""

    def __init__(self, shape: tuple, flows: int, hidden: int):
        super().__init__()
        self.shape = tuple(shape)
        dim = math.prod(self.shape)
        if dim < 2:
            raise ValueError("a RealNVP prior needs a latent of at least 2 dimensions")
        self.splits = []  # size of the conditioning (first) part at each flow
        first = dim // 2
        self.scale = nn.ModuleList()
        self.shift = nn.ModuleList()
        for _ in range(flows):
            self.splits.append(first)
            self.scale.append(_coupling_net(first, dim - first, hidden))
            self.shift.append(_coupling_net(first, dim - first, hidden))
            first = dim - first  # the halves swap: the transformed part conditions the next flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (u, log|det du/dz|)."""
        x = z.flatten(1)
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for a, s_net, t_net in zip(self.splits, self.scale, self.shift):
            x1, x2 = x[:, :a], x[:, a:]
            s = s_net(x1)
            x2 = x2 * torch.exp(s) + t_net(x1)
            log_det = log_det + s.sum(1)
            x = torch.cat([x2, x1], dim=1)
        return x, log_det

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """u -> z (flat), undoing forward flow by flow."""
        x = u
        for a, s_net, t_net in reversed(list(zip(self.splits, self.scale, self.shift))):
            b = x.shape[1] - a
            x2, x1 = x[:, :b], x[:, b:]
            x2 = (x2 - t_net(x1)) * torch.exp(-s_net(x1))
            x = torch.cat([x1, x2], dim=1)
        return x

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_det = self(z)
        return standard_normal_log_prob(u) + log_det

    def sample(self, n: int, device) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        u = torch.randn((n, math.prod(self.shape)), device=device, dtype=dtype)
        return self.inverse(u).view(n, *self.shape)


class CategoricalPrior(nn.Module):
    """One-hot draws over `classes` classes with class weights (a conditional GAN's labels).
    The weights start uniform; CGAN-MBL's balancing shifts them (a buffer, so checkpoints keep it)."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("weights", torch.full((shape[0],), 1.0 / shape[0]))

    def sample(self, n: int, device) -> torch.Tensor:
        classes = torch.multinomial(self.weights, n, replacement=True).to(device)
        return nn.functional.one_hot(classes, self.shape[0]).float()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self.weights.log()).sum(1)


class CodebookPrior(nn.Module):
    """A VQ-VAE codebook (van den Oord et al. 2017): K learnable code vectors of the latent's first
    dimension. A latent of shape [D, H, W] holds a code per position. `quantize(z)` puts each code
    vector of z at its nearest codebook entry (Euclidean), as a function of the codebook only: no
    gradient reaches z through it (a spec writes the straight-through estimator itself,
    `z + (quantize(z, e) - z).detach()`). `sample` draws each position's code uniformly, the
    VQ-VAE's prior during training. Entries start uniform in [-1/K, 1/K], as in the authors' code."""

    def __init__(self, shape: tuple, codes: int):
        super().__init__()
        self.shape = tuple(shape)
        self.codes = nn.Parameter(torch.empty(codes, self.shape[0]).uniform_(-1.0 / codes, 1.0 / codes))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The index of each code vector's nearest entry: shape (batch, *positions)."""
        flat = z.detach().movedim(1, -1).reshape(-1, self.shape[0]).to(self.codes.dtype)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codes.detach().t() + self.codes.detach().pow(2).sum(1)
        return distances.argmin(1).view(z.shape[0], *z.shape[2:])

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.codes[index].movedim(-1, 1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        return self.lookup(self.nearest(z)).to(z.dtype)

    def sample(self, n: int, device) -> torch.Tensor:
        index = torch.randint(len(self.codes), (n, *self.shape[1:]), device=device)
        return self.lookup(index)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise ValueError("a codebook's codes have no density (validation refuses log_prob of a codebook latent)")


def build_prior(latent: Latent) -> nn.Module:
    if latent.prior == "codebook":
        return CodebookPrior(latent.shape, int(latent.prior_args[0]))
    if latent.prior in plugins.PRIORS:
        return plugins.PRIORS[latent.prior].build(latent)
    if latent.prior == "categorical":
        return CategoricalPrior(latent.shape)
    if latent.prior == "uniform":
        return UniformPrior(latent.shape, *latent.prior_args)
    if latent.prior == "realnvp":
        return RealNVPPrior(latent.shape, int(latent.prior_kwargs.get("flows", 2)), int(latent.prior_kwargs.get("hidden", 64)))
    return NormalPrior(latent.shape)
