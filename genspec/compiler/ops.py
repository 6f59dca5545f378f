"""Torch implementations of the expression ops listed in registry.EXPRESSION_OPS."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from genspec.compiler.layers import Gaussian, full_precision, sum_last


def kl_normal(q: Gaussian) -> torch.Tensor:
    """KL(q || N(0, I)), summed over latent dims, averaged over the batch."""
    kl = 0.5 * (q.logvar.exp() + q.mean.pow(2) - 1.0 - q.logvar)
    return kl.flatten(1).sum(1).mean()


def kl_monte_carlo(q: Gaussian, prior) -> torch.Tensor:
    """KL(q || p) by one reparameterised draw: log q(z) - log p(z), the latter from the prior
    module (a flow's includes its log-determinant). Mean over the batch."""
    z = q.rsample()
    log_q = (-0.5 * (((z - q.mean) ** 2) / q.logvar.exp() + q.logvar + math.log(2 * math.pi))).flatten(1).sum(1)
    return (log_q - prior.log_prob(z)).mean()


def sqerr(a, b):
    return (a - b).pow(2).flatten(1).sum(1).mean()


class SoftLabel:
    """A named target: `value`, swapped to `other` for each example with probability `swap`,
    drawn anew at every use (so at every step: the loss node is computed once per step)."""

    def __init__(self, value: float, swap: float = 0.0, other: float = 0.0):
        self.value, self.swap, self.other = value, swap, other

    def like(self, p: torch.Tensor) -> torch.Tensor:
        dtype = full_precision(p)  # not bfloat16, whose 0.9 is 0.8984
        target = torch.full_like(p, self.value, dtype=dtype)
        if self.swap:
            swapped = torch.rand_like(p, dtype=dtype) < self.swap
            target = torch.where(swapped, torch.full_like(p, self.other, dtype=dtype), target)
        return target


def _bce_target(p: torch.Tensor, target, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(target, SoftLabel):
        return target.like(p).to(dtype)
    if not torch.is_tensor(target):
        return torch.full_like(p, float(target), dtype=dtype)
    return target.to(dtype)


def bce(p, target):
    # in float32 (float64 stays) and outside autocast, which refuses binary_cross_entropy on CUDA (log near 0 and 1)
    dtype = full_precision(p)
    with torch.autocast(p.device.type, enabled=False):
        return F.binary_cross_entropy(p.to(dtype), _bce_target(p, target, dtype))


def bce_from_logits(logits, target):
    """bce(sigmoid(logits), target), computed from the logits: the same value wherever the
    probability form is exact, and no saturation where it is not. On probabilities torch clamps
    log(p) at -100 and divides the gradient by max(p (1 - p), 1e-12), so once a logit falls below
    about -28 a generator's bce(d_fake, 1) passes back almost nothing (-4e-6 at -40, 0 at -120);
    from logits its gradient stays sigmoid(l) - 1, about -1."""
    dtype = full_precision(logits)
    with torch.autocast(logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.to(dtype), _bce_target(logits, target, dtype))


class Bernoulli:
    """Independent Bernoulli variables, from probabilities or (stabler) logits: log_prob(x) is
    -bce summed over each example's values, the Bernoulli likelihood of binary-ish data."""

    def __init__(self, probs: torch.Tensor | None = None, logits: torch.Tensor | None = None):
        self.probs, self.logits = probs, logits

    def log_prob(self, value: torch.Tensor, event_dims: int) -> torch.Tensor:
        if self.logits is not None:
            logits = self.logits.to(full_precision(self.logits))
            value = value.to(logits.dtype).expand_as(logits) if value.dim() < logits.dim() else value.to(logits.dtype)
            log_likelihood = -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        else:
            p = self.probs.to(full_precision(self.probs))
            # torch's bce clamps log at -100; so does this, so a saturated p gives a finite loss
            log_likelihood = value * p.log().clamp_min(-100) + (1 - value) * (1 - p).log().clamp_min(-100)
        return sum_last(log_likelihood, event_dims)


class Categorical:
    """A categorical distribution over classes from log-probabilities (the last dimension)."""

    def __init__(self, logp: torch.Tensor):
        self.logp = logp

    def log_prob(self, labels: torch.Tensor, event_dims: int = 1) -> torch.Tensor:
        logp = self.logp
        if labels.dim() < logp.dim() - 1:  # labels of the batch against k draws per example
            labels = labels.expand(logp.shape[:-1])
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _pairwise(fn, a, b):
    """min / max of tensors or numbers: a number meets a tensor on its device and in its dtype."""
    if not torch.is_tensor(a) and not torch.is_tensor(b):
        return fn(torch.as_tensor(float(a)), torch.as_tensor(float(b))).item()
    like = a if torch.is_tensor(a) else b
    a, b = (t if torch.is_tensor(t) else torch.as_tensor(float(t), dtype=like.dtype, device=like.device) for t in (a, b))
    return fn(a, b)


TENSOR_OPS = {
    "rsample": lambda q: q.rsample(),
    "mean_of": lambda q: q.mean,
    "sqerr": sqerr,
    "mse": lambda a, b: F.mse_loss(a, b),
    "l1": lambda a, b: F.l1_loss(a, b),
    "bce": bce,
    "nll": lambda logp, y: F.nll_loss(logp, y),
    "mean": lambda a: a.mean() if torch.is_tensor(a) else a,
    "sum": lambda a: a.sum() if torch.is_tensor(a) else a,
    "abs": lambda a: a.abs() if torch.is_tensor(a) else abs(a),
    "relu": lambda a: _elementwise(F.relu, a),
    "softplus": lambda a: _elementwise(F.softplus, a),
    "exp": lambda a: _elementwise(torch.exp, a),
    "log": lambda a: _elementwise(torch.log, a),
    "square": lambda a: _elementwise(torch.square, a),
    "sqrt": lambda a: _elementwise(torch.sqrt, a),
    "detach": lambda a: a.detach() if hasattr(a, "detach") else a,
    "noisy": lambda p, amount: noisy(p, amount),
    "l2dist": lambda a, b: (a - b).flatten(1).norm(dim=1).mean(),
    "bce_logits": bce_from_logits,
    "min": lambda a, b: _pairwise(torch.minimum, a, b),
    "max": lambda a, b: _pairwise(torch.maximum, a, b),
    "clamp": lambda a, low, high: a.clamp(low, high) if torch.is_tensor(a) else min(max(a, low), high),
    "logsumexp": lambda t: torch.logsumexp(t, dim=0),
    "bernoulli_logits": lambda l: Bernoulli(logits=l),
    "categorical": lambda logp: Categorical(logp),
    "argmax": lambda t: t.argmax(-1),
}


def _elementwise(fn, a):
    """An elementwise op on a tensor, or on a plain number (a param, a literal) as a 0-d tensor."""
    return fn(a) if torch.is_tensor(a) else fn(torch.as_tensor(float(a))).item()


# ops computed from a sigmoid network's logits instead of its output (compile.Compiler._bce)
FROM_LOGITS = {"bce": bce_from_logits}


def noisy(p: torch.Tensor, amount: float) -> torch.Tensor:
    """Noise injection on a discriminator's probabilities: (1 - a) p + a u with u ~ U[0, 1] per
    element, drawn at every use. Stays a probability, and the gradient through p scales by 1 - a."""
    if not 0 <= amount <= 1:
        raise ValueError(f"noisy: the amount must be in [0, 1], got {amount}")
    return (1 - amount) * p + amount * torch.rand_like(p)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, functional: bool = False) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x critic(x_hat)||_2 - 1)^2] at x_hat = e real + (1 - e) fake,
    e ~ U[0, 1] per example. The graph is kept so the penalty trains the critic (the second
    derivative through its parameters); in evaluation (no_grad) the penalty is still measured.

    `functional`: inside torch.func transforms (stacked replicas run their step under vmap, which
    refuses torch.autograd.grad), the input gradient comes from `torch.func.vjp`, which composes
    with vmap and with the ordinary backward pass after it. A vjp cannot let batch norm update its
    running statistics (an in-place write to a captured buffer), so one process keeps autograd.grad."""
    training = torch.is_grad_enabled()
    e = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = e * real.detach() + (1 - e) * fake.detach()
    if functional:
        scores, pullback = torch.func.vjp(critic, x_hat)
        (grad,) = pullback(torch.ones_like(scores))  # d sum(scores) / d x_hat: each example's own gradient
    else:
        with torch.enable_grad():
            x_hat.requires_grad_(True)
            (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=training)
    penalty = (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()
    return penalty if training else penalty.detach()
