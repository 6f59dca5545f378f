"""Discrete codes: a codebook latent, quantize (nearest entry), the straight-through estimator
written with detach, and specs/zoo/vqvae.yaml trained."""

from __future__ import annotations

import json

import pytest
import torch

import genspec
from genspec.compiler.model import Env, Model
from genspec.graph.dependencies import compute_order
from spec_helpers import REPO, cli_in_process, problems_of

VQVAE = REPO / "specs" / "zoo" / "vqvae.yaml"
CPU = torch.device("cpu")


def step_env(model: Model, x: torch.Tensor, names: list[str]) -> Env:
    order = compute_order(model.spec.graph_nx, [f"loss:{n}" for n in names])
    return model.compute(Env(x), [(n, model.node_fns[n]) for n in order])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Model(genspec.load(VQVAE), CPU)


def test_quantize_puts_every_code_vector_at_its_nearest_codebook_entry(model):
    x = torch.rand(16, 1, 8, 8)
    env = step_env(model, x, ["loss"])
    z_e, z_q = env["tensor:z_e"], env["tensor:z_q"]
    codes = model.priors["e"].codes
    assert z_q.shape == z_e.shape == (16, 16, 2, 2)
    vectors = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 16)
    nearest = torch.cdist(vectors, codes.detach()).argmin(1)  # brute force
    assert torch.equal(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 16), codes.detach()[nearest])


def test_the_straight_through_gradient_reaches_the_encoder_and_only_the_codebook_loss_moves_the_codes(model):
    x = torch.rand(16, 1, 8, 8)
    env = step_env(model, x, ["loss"])
    codes = model.priors["e"].codes
    enc_weight = model.networks["enc"].rows[1].weight
    rec, codebook, commitment = env["loss:rec"], env["loss:codebook"], env["loss:commitment"]
    g_codes_rec, g_enc_rec = torch.autograd.grad(rec, [codes, enc_weight], retain_graph=True, allow_unused=True)
    assert g_codes_rec is None  # the decoder's loss does not move the codebook (sg(z_q - z_e))
    assert g_enc_rec.abs().sum() > 0  # but reaches the encoder through the straight-through path
    (g_codes,) = torch.autograd.grad(codebook, [codes], retain_graph=True)
    assert g_codes.abs().sum() > 0
    g_codes_commit, g_enc_commit = torch.autograd.grad(commitment, [codes, enc_weight], allow_unused=True)
    assert g_codes_commit is None and g_enc_commit.abs().sum() > 0


def test_the_decoder_sees_the_codes_and_the_encoder_the_decoders_gradient(model):
    """Forward: x_rec is the decoder of z_q exactly. Backward: d rec / d z_e = d rec / d z_q."""
    x = torch.rand(8, 1, 8, 8)
    env = step_env(model, x, ["rec"])
    with torch.no_grad():
        assert torch.allclose(env["tensor:x_rec"], model.networks["dec"](env["tensor:z_q"]), atol=1e-6)
    z_q = env["tensor:z_q"].detach().requires_grad_(True)
    direct = ((model.networks["dec"](z_q) - x) ** 2).flatten(1).sum(1).mean()
    (want,) = torch.autograd.grad(direct, [z_q])
    (got,) = torch.autograd.grad(env["loss:rec"], [env["tensor:z_e"]])
    assert torch.allclose(got, want, atol=1e-6)


def test_a_trained_vqvae_reconstructs_from_codebook_entries_it_learned(tmp_path):
    rc, _, err = cli_in_process("run", VQVAE, "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    run = genspec.load_run(tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["test"]
    assert metrics["test"]["rec"] < first["rec"]  # it learned
    codebook = run.priors["e"]
    torch.manual_seed(0)
    initial = torch.empty_like(codebook.codes).uniform_(-1 / 64, 1 / 64)
    assert (codebook.codes.detach().abs().max() > 1 / 64)  # the codes moved out of their initial range
    assert not torch.allclose(codebook.codes.detach(), initial)
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:300] / 16.0, dtype=torch.float32)[:, None]
    with torch.no_grad():
        used = codebook.nearest(run.networks["enc"](x)).unique()
    assert len(used) > 3  # the encoder does not map everything to one code (40 epochs use 10 of 64)


def test_sampling_draws_uniform_codes_from_the_codebook(model):
    torch.manual_seed(1)
    draws = model.priors["e"].sample(500, CPU)
    assert draws.shape == (500, 16, 2, 2)
    vectors = draws.permute(0, 2, 3, 1).reshape(-1, 16)
    index = torch.cdist(vectors, model.priors["e"].codes.detach()).argmin(1)
    assert torch.allclose(vectors, model.priors["e"].codes.detach()[index])
    assert len(index.unique()) > 55  # 2,000 uniform draws of 64 codes leave almost none out


def test_quantize_and_the_codebook_are_validated():
    text = VQVAE.read_text()
    problems = problems_of(text.replace("codebook(64)", "normal").replace("[enc, dec, e]", "[enc, dec]"), "vqvae.yaml")
    assert any("graph.z_q" in p and "codebook(K)" in p for p in problems), problems
    problems = problems_of(text.replace("codebook(64)", "codebook(1)"), "vqvae.yaml")
    assert any("latent.e.prior" in p and ">= 2" in p for p in problems), problems
    problems = problems_of(text.replace("quantize(z_e, e)", "quantize(x, e)"), "vqvae.yaml")
    assert any("graph.z_q" in p and "1x8x8" in p and "16x2x2" in p for p in problems), problems
    problems = problems_of(text.replace("networks: [enc, dec, e]", "networks: [enc, dec]"), "vqvae.yaml")
    assert any("latent.e" in p and "no objective trains it" in p for p in problems), problems


def test_show_counts_the_codebook_in_the_objective():
    rc, out, _ = cli_in_process("show", VQVAE)
    assert rc == 0
    line = next(l for l in out.splitlines() if l.startswith("vqvae"))
    assert line.rstrip().endswith(f"{4944 + 8737 + 64 * 16:,}")
