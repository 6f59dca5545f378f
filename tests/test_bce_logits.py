"""bce of a network that ends in a sigmoid is computed from its logits: the same value where the
probability form is exact, and a gradient that does not vanish where it saturates."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.nn import functional as F

import genspec
from genspec.compiler.model import Env, Model
from genspec.graph.dependencies import to_json, to_text
from spec_helpers import tiny_gan_doc


def _spec(tmp_path, **changes):
    doc = tiny_gan_doc("logitgan", 0.002, [{"update": ["dis"]}, {"update": ["gen"], "batch": "same"}])
    doc["losses"].update(changes)
    path = tmp_path / "gan.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return genspec.load(path)


def _losses(model: Model, x: torch.Tensor, seed: int = 0) -> Env:
    torch.manual_seed(seed)
    plan = model.phases[0]
    return model.compute(Env(x), plan.nodes)


def test_the_graph_marks_which_bce_comes_from_logits(tmp_path):
    spec = _spec(tmp_path, d_real="bce(dis(x), 1)", noisy_real="bce(noisy(dis(x), 0.1), 1)", scaled="bce(0.5 * dis(x), 1)")
    text = to_text(spec.graph_nx)
    assert "loss:d_real = bce(dis(x), 1)  [scalar]  (bce from logits: dis(x))" in text
    line = next(l for l in text.splitlines() if l.startswith("loss:noisy_real"))
    assert "from logits" not in line  # noise mixed into the probability: no logits to read
    assert "from logits" not in next(l for l in text.splitlines() if l.startswith("loss:scaled"))
    nodes = {n["id"]: n for n in to_json(spec.graph_nx)["nodes"]}
    assert nodes["loss:g_adv"]["bce_from_logits"] == ["dis(fake)"]


def test_bce_from_logits_equals_bce_of_probabilities_where_it_does_not_saturate(tmp_path):
    spec = _spec(tmp_path)
    model = Model(spec, torch.device("cpu"))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    env = _losses(model, x)
    p = model.networks["dis"](x)
    assert p.min() > 1e-3 and p.max() < 1 - 1e-3
    assert torch.allclose(env["loss:d_real"], F.binary_cross_entropy(p, torch.ones_like(p)), rtol=1e-6, atol=1e-7)
    # a soft, swapped label target goes through the same path
    assert model.networks["dis"].ends_in_sigmoid
    assert set(model.networks["dis"].forward_taps(x)) == {None, "(logits)"}
    assert torch.allclose(model.networks["dis"].forward_taps(x)["(logits)"].sigmoid(), p)


def test_a_saturated_discriminator_still_passes_gradient_to_the_generator(tmp_path):
    spec = _spec(tmp_path)
    model = Model(spec, torch.device("cpu"))
    with torch.no_grad():  # the discriminator's logit for every input near -60: sigmoid 9e-27
        model.networks["dis"].rows[-1].linear.weight.zero_()
        model.networks["dis"].rows[-1].linear.bias.fill_(-60.0)
        model.networks["dis"].rows[-1].linear.weight[0, 0] = 1.0  # and a path back to the generator
    torch.manual_seed(0)
    env = model.compute(Env(torch.zeros(16, 1, 8, 8)), model.phases[1].nodes)
    g_adv, fake = env["loss:g_adv"], env["tensor:fake"]
    assert g_adv.item() == pytest.approx(60.0, rel=1e-2)
    (grad,) = torch.autograd.grad(g_adv, fake, retain_graph=True)
    p = model.networks["dis"](fake)
    (old,) = torch.autograd.grad(F.binary_cross_entropy(p, torch.ones_like(p)), fake)
    assert old.abs().max().item() < 1e-12  # the probability form passes back nothing
    # from the logits, d g_adv / d logit = sigmoid(l) - 1 = -1 per example: the gradient is the
    # logit's own input gradient over the batch (sum over the 16 examples = sum of dl/dfake / 16)
    logits = model.networks["dis"].forward_taps(fake)["(logits)"]
    (expected,) = torch.autograd.grad(-logits.sum() / 16, fake)
    assert torch.allclose(grad, expected, atol=1e-7) and grad.abs().max().item() > 1e-3
