"""Loss algebra: bce_logits, min/max/clamp, per-example reductions, log_prob, rsample(q, k),
logsumexp, argmax/onehot, and IWAE written with them (k = 1 is the VAE's bound)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch.nn import functional as F

import genspec
from genspec.compiler.model import Env, Model
from genspec.graph.dependencies import compute_order, to_text
from spec_helpers import REPO, cli_in_process, problems_of

IWAE = REPO / "specs" / "zoo" / "iwae.yaml"
CPU = torch.device("cpu")


def iwae_spec(k: int = 5, *overrides):
    return genspec.load(IWAE, [f"params.k={k}", *overrides])


def losses(model: Model, x: torch.Tensor, names: list[str], seed: int | None = 0, y=None) -> dict:
    """The named losses on one batch, computed as a training step computes them."""
    if seed is not None:
        torch.manual_seed(seed)
    spec = model.spec
    order = compute_order(spec.graph_nx, [f"loss:{n}" for n in names])
    env = model.compute(Env(x, y), [(n, model.node_fns[n]) for n in order])
    return {n: env[f"loss:{n}"] for n in names} | {"env": env}


def digits(n: int = 64) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.rand(n, 1, 8, 8)


# ---------------------------------------------------------------- IWAE

def test_iwae_with_one_sample_is_the_single_draw_elbo_computed_by_hand():
    """k = 1: log w = log p(x|h) + log p(h) - log q(h|x) for one draw h, the VAE's Monte Carlo bound."""
    spec = iwae_spec(1)
    model = Model(spec, CPU)
    x = digits()
    bound = losses(model, x, ["bound"], seed=7)["bound"]
    torch.manual_seed(7)
    enc, dec = model.networks["enc"], model.networks["dec"]
    q = enc(x)
    std = torch.exp(0.5 * q.logvar)
    h = q.mean + std * torch.randn(1, *q.mean.shape)[0]  # the one draw rsample(q, 1) makes
    logits = dec.forward_taps(h)["(logits)"]
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    log_ph = (-0.5 * (h ** 2 + math.log(2 * math.pi))).sum(1)
    log_qh = (-0.5 * (((h - q.mean) / std) ** 2 + q.logvar + math.log(2 * math.pi))).sum(1)
    assert bound.item() == pytest.approx((log_px + log_ph - log_qh).mean().item(), rel=1e-5)


def test_iwae_with_one_sample_equals_the_vae_bound_on_average():
    """Averaged over draws, the k = 1 bound is the ELBO with the analytic KL; k = 5 lies above it."""
    spec = iwae_spec(1)
    model = Model(spec, CPU)
    x = digits(256)
    with torch.no_grad():
        draws = [losses(model, x, ["bound", "elbo"], seed=s) for s in range(40)]
        five = Model(iwae_spec(5), CPU)
        five.networks.load_state_dict(model.networks.state_dict())
        k5 = [losses(five, x, ["bound"], seed=s)["bound"].item() for s in range(40)]
    k1 = sum(d["bound"].item() for d in draws) / len(draws)
    elbo = sum(d["elbo"].item() for d in draws) / len(draws)
    assert k1 == pytest.approx(elbo, abs=0.05)
    assert sum(k5) / len(k5) > k1 + 0.05  # the importance-weighted bound is tighter (Burda et al., Thm 1)


def test_a_trained_iwae_run_reports_the_bound_above_the_elbo_and_its_k1_twin_matches_it(tmp_path):
    rc, _, err = cli_in_process("run", IWAE, "--out", tmp_path / "k5", "--no-progress", "--set", "train.epochs=3")
    assert rc == 0, err
    import json
    metrics = json.loads((tmp_path / "k5" / "metrics.json").read_text())
    assert metrics["test"]["bound"] > metrics["test"]["elbo"]
    run = genspec.load_run(tmp_path / "k5")
    model = Model(iwae_spec(1), CPU)
    for name, net in run.networks.items():
        model.networks[name].load_state_dict(net.state_dict())
    model.train(False)
    x = digits(256)
    with torch.no_grad():
        draws = [losses(model, x, ["bound", "elbo"], seed=s) for s in range(40)]
    assert sum(d["bound"].item() for d in draws) / 40 == pytest.approx(sum(d["elbo"].item() for d in draws) / 40, abs=0.05)


def test_the_graph_shows_the_sample_axis():
    text = to_text(iwae_spec(5).graph_nx)
    assert "tensor:h = rsample(q, k)  [tensor 8] x 5 samples" in text
    assert "tensor:x_p = dec(h)  [tensor 1x8x8] x 5 samples" in text
    assert "loss:bound = mean(logsumexp(log_w) - log(k))  [scalar]" in text


def test_a_network_runs_each_draw_as_an_example():
    model = Model(iwae_spec(3), CPU)
    x = digits(8)
    env = losses(model, x, ["bound"])["env"]
    h, x_p = env["tensor:h"], env["tensor:x_p"]
    assert h.shape == (3, 8, 8) and x_p.shape == (3, 8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(x_p[2, 5], model.networks["dec"](h[2, 5:6])[0], atol=1e-6)
    assert env["tensor:log_w"].shape == (3, 8)


# ---------------------------------------------------------------- validation of the sample axis

def _iwae_text(**graph) -> str:
    doc = yaml.safe_load(IWAE.read_text())
    doc["graph"].update(graph)
    return yaml.safe_dump(doc, sort_keys=False)


def test_batch_reducing_ops_refuse_a_sample_axis():
    problems = problems_of(_iwae_text(x_p="dec(h)").replace("elbo: mean(log_prob", "extra: sqerr(x_p, x)\n  elbo: mean(log_prob"), "iwae.yaml")
    assert any("losses.extra" in p and "sample axis" in p and "logsumexp" in p for p in problems), problems


def test_logsumexp_needs_a_sample_axis_and_the_count_must_be_whole():
    text = IWAE.read_text().replace("mean(logsumexp(log_w) - log(k))", "mean(logsumexp(log_prob(q, mean_of(q))))")
    assert any("losses.bound" in p and "has none" in p for p in problems_of(text, "iwae.yaml"))
    text = IWAE.read_text().replace("rsample(q, k)", "rsample(q, 2.5)")
    assert any("graph.h" in p and "whole number" in p for p in problems_of(text, "iwae.yaml"))
    text = IWAE.read_text().replace("rsample(q, k)", "rsample(q, k, 3)")
    assert any("graph.h" in p and "rsample takes 1 or 2 argument(s)" in p for p in problems_of(text, "iwae.yaml"))


def test_log_prob_checks_its_value_against_the_distribution():
    text = IWAE.read_text().replace("log_prob(z, h)", "log_prob(z, x)")
    problems = problems_of(text, "iwae.yaml")
    assert any("graph.log_w" in p and "log_prob" in p and "8" in p and "1x8x8" in p for p in problems), problems
    text = IWAE.read_text().replace("bernoulli(x_p)", "bernoulli(2 * x_p)")
    assert any("bernoulli: takes probabilities" in p and "[0, 2]" in p for p in problems_of(text, "iwae.yaml"))


# ---------------------------------------------------------------- the other ops

CLASSIFIER = """
genspec: 1
name: algebra
data: {dataset: digits, range: [0, 1], labels: true, split: {train: 200, test: 50}}
networks:
  cls:
    input: x
    layers: [flatten, "fc 10, log_softmax"]
  raw:
    input: x
    layers: [flatten, fc 1]
  prob:
    input: x
    layers: [flatten, "fc 1, sigmoid"]
graph:
  logp: cls(x)
  y_hat: argmax(logp)
losses:
  nll_loss: nll(logp, y)
  nll_by_log_prob: -mean(log_prob(categorical(logp), y))
  real: bce_logits(raw(x), 1)
  hinge: mean(max(0, 1 - raw(x)))
  floor: mean(min(raw(x), 0.5))
  clamped: mean(clamp(raw(x), -0.1, 0.1))
  per_example_sum: mean(sum_per_example(x))
  per_example_mean: mean(mean_per_example(x))
  agree: mean(onehot(y_hat) * onehot(y))
  seven: mean(onehot(7) * onehot(y))
  bern: mean(log_prob(bernoulli(prob(x)), 1 - 0 * prob(x)))
  total: nll_loss + real + hinge + floor + clamped + bern
objectives:
  all: {networks: [cls, raw, prob], minimize: total, optimizer: adam(0.001)}
train: {epochs: 1, batch_size: 32}
"""


@pytest.fixture
def algebra(tmp_path):
    path = tmp_path / "algebra.yaml"
    path.write_text(CLASSIFIER)
    spec = genspec.load(path)
    model = Model(spec, CPU)
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    names = [n for n in spec.losses]
    return model, x, y, losses(model, x, names, y=y)


def test_elementwise_and_reduction_ops_match_torch(algebra):
    model, x, y, out = algebra
    with torch.no_grad():
        logp, raw = model.networks["cls"](x), model.networks["raw"](x)
    assert out["nll_by_log_prob"].item() == pytest.approx(F.nll_loss(logp, y).item(), rel=1e-6)
    assert out["real"].item() == pytest.approx(F.binary_cross_entropy_with_logits(raw, torch.ones_like(raw)).item(), rel=1e-6)
    assert out["hinge"].item() == pytest.approx(F.relu(1 - raw).mean().item(), rel=1e-6)
    assert out["floor"].item() == pytest.approx(raw.clamp(max=0.5).mean().item(), rel=1e-6)
    assert out["clamped"].item() == pytest.approx(raw.clamp(-0.1, 0.1).mean().item(), rel=1e-6)
    assert out["per_example_sum"].item() == pytest.approx(x.sum().item() / 32, rel=1e-6)
    assert out["per_example_mean"].item() == pytest.approx(x.mean().item(), rel=1e-6)
    agree = (logp.argmax(1) == y).float().mean().item() / 10  # one matching one-hot entry in ten
    assert out["agree"].item() == pytest.approx(agree, rel=1e-6)
    assert out["seven"].item() == pytest.approx((y == 7).float().mean().item() / 10, rel=1e-6)
    with torch.no_grad():
        p = model.networks["prob"](x)
    assert out["bern"].item() == pytest.approx(p.log().mean().item(), rel=1e-5)


def test_bce_logits_stays_finite_and_passes_gradient_where_bce_saturates():
    logits = torch.tensor([[-200.0], [0.0], [200.0]], requires_grad=True)
    from genspec.compiler.ops import TENSOR_OPS

    loss = TENSOR_OPS["bce_logits"](logits, 1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx((200 + math.log(2)) / 3, rel=1e-6)
    assert logits.grad[0].item() == pytest.approx(-1 / 3, rel=1e-6)


def test_the_ops_are_validated_where_they_are_written(tmp_path):
    bad = CLASSIFIER.replace("bce_logits(raw(x), 1)", "bce_logits(prob(x), 1)")
    problems = problems_of(bad, "algebra.yaml")
    assert any("losses.real" in p and "ends in a sigmoid" in p for p in problems), problems
    bad = CLASSIFIER.replace("onehot(7)", "onehot(12)")
    assert any("losses.seven" in p and "[0, 9]" in p for p in problems_of(bad, "algebra.yaml"))
    bad = CLASSIFIER.replace("log_prob(categorical(logp), y)", "log_prob(categorical(logp), x)")
    assert any("losses.nll_by_log_prob" in p and "class labels" in p for p in problems_of(bad, "algebra.yaml"))
    bad = CLASSIFIER.replace("argmax(logp)", "argmax(x)")
    assert any("graph.y_hat" in p and "argmax" in p for p in problems_of(bad, "algebra.yaml"))
    bad = CLASSIFIER.replace("bce_logits(raw(x), 1)", "bce_logits(raw(x), 3)")
    assert any("losses.real" in p and "outside [0, 1]" in p for p in problems_of(bad, "algebra.yaml"))


def test_a_spec_using_the_ops_trains(tmp_path):
    path = tmp_path / "algebra.yaml"
    path.write_text(CLASSIFIER)
    rc, out, err = cli_in_process("run", path, "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err


def test_a_sample_axis_too_large_for_memory_is_refused_at_the_network_call():
    """validate's memory estimate counts a call on rsample(q, k)'s draws k times."""
    text = IWAE.read_text().replace("params: {k: 5,", "params: {k: 100000000,")
    problems = problems_of(text, "iwae.yaml")
    assert any("graph.x_p" in p and "dec(h) runs on 100,000,000 draws per example" in p and "memory_budget" in p
               for p in problems), problems
    text = IWAE.read_text().replace("params: {k: 5,", "params: {k: 500,")  # 500 draws fit
    from spec_helpers import check
    check(text, "iwae.yaml")
