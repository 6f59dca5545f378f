"""Latent priors and the ELBO terms: the RealNVP flow prior (invertibility, log-determinant
against autograd's Jacobian, a density that integrates to one and matches its own samples,
parameter counts) and the reconstruction / KL losses of a tiny VAE against a hand computation
(analytic KL for a normal prior, the one-draw Monte Carlo KL for a flow prior).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

import genspec
from genspec.compiler.model import Env, Model
from genspec.data.datasets import load_data
from genspec.graph.dependencies import compute_order
from genspec.compiler.priors import NormalPrior, RealNVPPrior, build_prior
from genspec.lang.spec import Latent


def sharpened(prior: RealNVPPrior, gain: float = 3.0) -> RealNVPPrior:
    """Scale the last layer of every s and t net so the couplings do real work (default
    initialisation gives scales close to 1 and small shifts, which hides sign mistakes)."""
    with torch.no_grad():
        for net in [*prior.scale, *prior.shift]:
            last = [m for m in net if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(gain)
            last.bias.mul_(gain)
    return prior


def flow(dim_or_shape, flows: int, hidden: int = 64, seed: int = 0, gain: float = 3.0) -> RealNVPPrior:
    torch.manual_seed(seed)
    shape = (dim_or_shape,) if isinstance(dim_or_shape, int) else tuple(dim_or_shape)
    return sharpened(RealNVPPrior(shape, flows, hidden), gain)


# ---------------------------------------------------------------- RealNVP

@pytest.mark.parametrize("dim", [16, 5])
@pytest.mark.parametrize("flows", [1, 2, 6])
def test_realnvp_inverse_undoes_forward(dim, flows):
    prior = flow(dim, flows, seed=flows)
    z = torch.randn(64, dim) * 2
    with torch.no_grad():
        u, log_det = prior(z)
        back = prior.inverse(u)
    assert u.shape == (64, dim) and log_det.shape == (64,)
    assert not torch.allclose(u, z, atol=1e-2), "the flow should not be the identity"
    torch.testing.assert_close(back, z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("flows", [1, 2, 6])
def test_realnvp_log_det_equals_autograd_jacobian(dim, flows):
    prior = flow(dim, flows, seed=10 + flows).double()
    torch.manual_seed(1)
    for z in torch.randn(3, dim, dtype=torch.float64) * 1.5:
        jac = torch.autograd.functional.jacobian(lambda v: prior(v.unsqueeze(0))[0][0], z)
        assert jac.shape == (dim, dim)
        expected = torch.linalg.slogdet(jac).logabsdet
        with torch.no_grad():
            _, log_det = prior(z.unsqueeze(0))
        got = float(log_det[0].detach())
        assert abs(got - float(expected)) < 1e-9, (got, float(expected))
        assert abs(float(expected)) > 1e-3  # a volume-changing map, so the check can fail


def test_realnvp_density_integrates_to_one_and_matches_its_samples():
    prior = flow(2, 3, seed=0)
    side = torch.linspace(-20, 20, 401)
    gx, gy = torch.meshgrid(side, side, indexing="ij")
    points = torch.stack([gx.flatten(), gy.flatten()], 1)
    with torch.no_grad():
        torch.manual_seed(5)
        samples = prior.sample(40000, "cpu").double()
        density = prior.log_prob(points).exp().double()
    points = points.double()
    area = float(side[1] - side[0]) ** 2
    total = float(density.sum()) * area
    assert abs(total - 1.0) < 5e-3, total
    # the density's first and second moments agree with those of sample() (Monte Carlo error ~0.02)
    grid_mean = (density[:, None] * points).sum(0) * area
    torch.testing.assert_close(samples.mean(0), grid_mean, atol=0.08, rtol=0)
    grid_sq = (density[:, None] * points.pow(2)).sum(0) * area
    torch.testing.assert_close(samples.pow(2).mean(0), grid_sq, atol=0.1 * float(grid_sq.max()), rtol=0)
    assert float((grid_sq - 1).abs().max()) > 0.3  # far from the standard normal, so the check has teeth


def test_realnvp_log_prob_is_change_of_variables_of_its_samples():
    prior = flow((4, 2, 2), 6, seed=3)
    torch.manual_seed(7)
    u = torch.randn(32, 16)
    torch.manual_seed(7)
    with torch.no_grad():
        z = prior.sample(32, "cpu")
        u_back, log_det = prior(z)
        log_p = prior.log_prob(z)
    assert z.shape == (32, 4, 2, 2) and log_p.shape == (32,)
    torch.testing.assert_close(u_back, u, atol=1e-4, rtol=0)
    expected = -0.5 * (u.pow(2) + math.log(2 * math.pi)).sum(1) + log_det
    torch.testing.assert_close(log_p, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("flows", [1, 2, 6])
def test_realnvp_parameter_count(flows):
    dim, hidden = 16, 64
    half = dim // 2
    per_flow = 2 * ((half * hidden + hidden) + (hidden * hidden + hidden) + (hidden * half + half))
    prior = build_prior(Latent("z", (dim,), "realnvp", (), {"flows": flows, "hidden": hidden}))
    assert isinstance(prior, RealNVPPrior)
    assert sum(p.numel() for p in prior.parameters()) == flows * per_flow
    assert all(p.requires_grad for p in prior.parameters())
    # an odd latent alternates a 2 -> 3 and a 3 -> 2 coupling
    odd = RealNVPPrior((5,), 2, hidden)

    def net(n_in, n_out):
        return (n_in * hidden + hidden) + (hidden * hidden + hidden) + (hidden * n_out + n_out)
    assert sum(p.numel() for p in odd.parameters()) == 2 * net(2, 3) + 2 * net(3, 2)
    # a normal prior has nothing to train
    assert not list(build_prior(Latent("z", (dim,), "normal")).parameters())


def test_realnvp_sample_shapes():
    prior = RealNVPPrior((4, 2, 2), 2, 64)
    with torch.no_grad():
        assert prior.sample(7, "cpu").shape == (7, 4, 2, 2)
        assert prior.log_prob(torch.randn(7, 4, 2, 2)).shape == (7,)
    assert NormalPrior((4, 2, 2)).sample(3, "cpu").shape == (3, 4, 2, 2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        RealNVPPrior((1,), 2, 64)


# ---------------------------------------------------------------- ELBO terms by hand

TINY_VAE = textwrap.dedent("""\
    genspec: 1
    name: tiny_elbo
    data: {dataset: digits, split: {train: 64, test: 32}}
    latent:
      z: {shape: [2], prior: PRIOR}
    networks:
      enc:
        input: x
        layers: [flatten, gaussian 2]
      dec:
        input: z
        layers: [fc 64, reshape 1 8 8]
    graph:
      q: enc(x)
      z: rsample(q)
      x_rec: dec(z)
    losses:
      rec: sqerr(x_rec, x)
      kl: kl(q, z)
      nelbo: rec + kl
    objectives:
      vae: {networks: NETS, minimize: nelbo, optimizer: adam(1e-3)}
    train: {epochs: 1, batch_size: 16, device: cpu}
    """)


def tiny_model(tmp_path, prior: str):
    nets = "[enc, dec]" if prior == "normal" else "[enc, dec, z]"
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_VAE.replace("PRIOR", f'"{prior}"').replace("NETS", nets))
    spec = genspec.load(path)
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    enc, dec = model.networks["enc"].rows[1].linear, model.networks["dec"].rows[0].linear
    with torch.no_grad():  # deterministic weights, so the hand computation below is self-contained
        enc.weight.copy_(torch.sin(torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64)) * 0.08)
        enc.bias.copy_(torch.tensor([0.1, -0.2, -0.6, 0.3]))
        dec.weight.copy_(torch.cos(torch.arange(64 * 2, dtype=torch.float32).reshape(64, 2)) * 0.3)
        dec.bias.copy_(torch.linspace(0, 0.5, 64))
    model.networks.double()
    model.priors.double()
    model.train(False)
    x = load_data(spec.data, 0).train.x[:10].double()
    return spec, model, x


def loss_of(spec, model, x, name: str, seed: int) -> float:
    """genspec's value of one loss: only the nodes that loss needs, computed on an Env."""
    nodes = [(n, model.node_fns[n]) for n in compute_order(spec.graph_nx, [f"loss:{name}"])]
    torch.manual_seed(seed)
    with torch.no_grad():
        env = model.compute(Env(x), nodes)
    return float(env[f"loss:{name}"])


def by_hand_q(model, x):
    enc = model.networks["enc"].rows[1].linear
    h = x.reshape(len(x), -1).numpy() @ enc.weight.detach().numpy().T + enc.bias.detach().numpy()
    return h[:, :2], h[:, 2:]  # mean, log-variance


def draw_eps(seed: int, n: int) -> np.ndarray:
    torch.manual_seed(seed)
    return torch.randn(n, 2, dtype=torch.float64).numpy()


def test_rec_and_analytic_kl_against_hand_computation(tmp_path):
    spec, model, x = tiny_model(tmp_path, "normal")
    mean, logvar = by_hand_q(model, x)
    eps = draw_eps(3, len(x))
    z = mean + np.exp(0.5 * logvar) * eps
    dec = model.networks["dec"].rows[0].linear
    x_rec = z @ dec.weight.detach().numpy().T + dec.bias.detach().numpy()
    per_image = ((x_rec - x.reshape(len(x), -1).numpy()) ** 2).sum(axis=1)
    rec = per_image.mean()
    kl = (0.5 * (np.exp(logvar) + mean ** 2 - 1.0 - logvar)).sum(axis=1).mean()
    assert abs(loss_of(spec, model, x, "rec", seed=3) - rec) < 1e-5
    assert abs(loss_of(spec, model, x, "kl", seed=3) - kl) < 1e-5
    assert abs(loss_of(spec, model, x, "nelbo", seed=3) - (rec + kl)) < 1e-5
    assert kl > 0.05 and rec > 1.0  # values big enough to tell a mean from a sum


def test_monte_carlo_kl_with_flow_prior_against_hand_computation(tmp_path):
    spec, model, x = tiny_model(tmp_path, "realnvp(flows=2, hidden=8)")
    prior = model.priors["z"]
    with torch.no_grad():
        sharpened(prior, 3.0)
    mean, logvar = by_hand_q(model, x)
    eps = draw_eps(11, len(x))  # kl draws its own z from q, with the generator as seeded
    z = mean + np.exp(0.5 * logvar) * eps
    log_q = (-0.5 * ((z - mean) ** 2 / np.exp(logvar) + logvar + np.log(2 * np.pi))).sum(axis=1)
    # log p(z): the couplings applied by hand (split, affine, swap), base density plus log-determinant
    h, log_det = torch.from_numpy(z), np.zeros(len(x))
    with torch.no_grad():
        for a, s_net, t_net in zip(prior.splits, prior.scale, prior.shift):
            x1, x2 = h[:, :a], h[:, a:]
            s, t = s_net(x1), t_net(x1)
            log_det += s.sum(1).numpy()
            h = torch.cat([x2 * torch.exp(s) + t, x1], 1)
    log_p = (-0.5 * (h.numpy() ** 2 + np.log(2 * np.pi))).sum(axis=1) + log_det
    expected = (log_q - log_p).mean()
    assert abs(loss_of(spec, model, x, "kl", seed=11) - expected) < 1e-5
    # it is not the analytic KL against N(0, I): the flow's density matters
    analytic = (0.5 * (np.exp(logvar) + mean ** 2 - 1.0 - logvar)).sum(axis=1).mean()
    assert abs(expected - analytic) > 1e-2
