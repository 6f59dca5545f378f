"""Weight constraints: `clip` on an objective (WGAN's weight clipping) after each of its steps."""

from __future__ import annotations

import pytest
import torch

from genspec.experiments.stack import cannot_stack
from spec_helpers import REPO, check, cli_in_process, problems_of

import genspec

WGAN_CLIP = REPO / "specs" / "zoo" / "wgan_clip.yaml"
SHORT = ["--set", "train.epochs=2", "--set", "data.split={train: 320, test: 64}", "--no-progress"]


def trained(tmp_path, *extra) -> dict:
    rc, _, err = cli_in_process("run", WGAN_CLIP, "--out", tmp_path / "run", *SHORT, *extra)
    assert rc == 0, err
    return torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]["networks"]


def largest(state: dict, network: str) -> float:
    return max(v.abs().max().item() for k, v in state.items() if k.startswith(f"{network}.") and v.is_floating_point())


def test_after_a_wgan_clip_run_every_critic_weight_lies_within_the_clip(tmp_path):
    state = trained(tmp_path)
    assert largest(state, "dis") <= 0.01
    assert largest(state, "gen") > 0.01  # the generator's objective does not clip


def test_without_clip_the_critic_leaves_the_bound(tmp_path):
    """The check above can fail: the same run without `clip` has critic weights far outside it."""
    state = trained(tmp_path, "--set", "objectives.dis={minimize: d_loss, optimizer: rmsprop(lr)}")
    assert largest(state, "dis") > 0.05


def test_show_lists_the_clip_beside_the_optimiser():
    rc, out, _ = cli_in_process("show", WGAN_CLIP)
    assert rc == 0
    assert "rmsprop(lr=5e-05), then clip to [-0.01, 0.01]" in out


def test_a_clip_must_be_a_positive_number():
    text = WGAN_CLIP.read_text().replace("clip: 0.01}", "clip: 0}")
    problems = problems_of(text, "wgan.yaml")
    assert any("objectives.dis.clip" in p and "wgan.yaml:" in p for p in problems), problems
    text = WGAN_CLIP.read_text().replace("clip: 0.01}", "clip: small}")
    assert any("objectives.dis.clip" in p for p in problems_of(text, "wgan.yaml"))


def test_a_clipped_spec_is_not_stacked():
    """The stacked step fires no hooks: a study trains such seeds one at a time, saying why."""
    assert "clips its weights" in cannot_stack(genspec.load(WGAN_CLIP))


# ---------------------------------------------------------------- spectral normalisation

TINY_SNGAN = (REPO / "tests" / "fixtures" / "tiny_sngan.yaml").read_text()


def test_every_discriminator_conv_and_fc_of_a_loaded_run_is_spectrally_normalised(tmp_path):
    from torch import nn
    from torch.nn.utils import parametrize

    (tmp_path / "sngan.yaml").write_text(TINY_SNGAN)
    rc, _, err = cli_in_process("run", tmp_path / "sngan.yaml", "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    run = genspec.load_run(tmp_path / "run")
    weighted = lambda net: [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted(run.networks["dis"])) == 3
    assert all(parametrize.is_parametrized(m, "weight") for m in weighted(run.networks["dis"]))
    assert not any(parametrize.is_parametrized(m, "weight") for m in weighted(run.networks["gen"]))
    for m in weighted(run.networks["dis"]):  # (no gradients needed below)
        # torch's spectral_norm: the weight is the trained one over u^T W v, the power iteration's estimate
        original = m.parametrizations.weight.original
        sn = m.parametrizations.weight[0]
        with torch.no_grad():
            sigma = torch.dot(sn._u, original.flatten(1) @ sn._v)
            assert torch.allclose(m.weight, original / sigma, atol=1e-6)
            assert float(torch.linalg.matrix_norm(m.weight.flatten(1), 2)) == pytest.approx(1.0, abs=0.05)


def test_sn_on_a_row_and_its_mistakes_are_located():
    text = TINY_SNGAN.replace("    spectral_norm: true\n", "").replace('"fc 16, lrelu 0.1"', '"fc 16, lrelu 0.1, sn"')
    spec = check(text)
    assert [bool(info.row.get("sn")) for info in spec.networks["dis"].info.rows] == [False, False, True, False]
    problems = problems_of(TINY_SNGAN.replace("flatten,", '"flatten, sn",'), "sngan.yaml")
    assert any("networks.dis.layers[1]" in p and "'sn'" in p and "'flatten'" in p for p in problems), problems
    problems = problems_of(TINY_SNGAN.replace("spectral_norm: true", "spectral_norm: yes please"), "sngan.yaml")
    assert any("networks.dis.spectral_norm" in p for p in problems), problems


def test_spectrally_normalised_specs_are_not_stacked(tmp_path):
    (tmp_path / "sngan.yaml").write_text(TINY_SNGAN)
    assert "spectrally normalised" in cannot_stack(genspec.load(tmp_path / "sngan.yaml"))


def test_the_sngan_zoo_spec_trains_with_every_discriminator_weight_normalised(tmp_path):
    from torch import nn
    from torch.nn.utils import parametrize

    rc, _, err = cli_in_process("run", REPO / "specs" / "zoo" / "sngan.yaml", "--out", tmp_path / "run", "--no-progress",
                                "--set", "train.epochs=1", "--set", "data.split={train: 256, test: 64}")
    assert rc == 0, err
    run = genspec.load_run(tmp_path / "run")
    weighted = [m for m in run.networks["dis"].modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 3 and all(parametrize.is_parametrized(m, "weight") for m in weighted)


def test_elementwise_ops_compute_what_they_say():
    from genspec.compiler.ops import TENSOR_OPS as OPS

    a = torch.tensor([-2.0, 0.0, 3.0, 100.0])
    assert OPS["relu"](a).tolist() == [0.0, 0.0, 3.0, 100.0]
    assert OPS["softplus"](a)[-1] == 100.0 and torch.allclose(OPS["softplus"](a[:3]), torch.log1p(torch.exp(a[:3])))
    assert torch.allclose(OPS["log"](OPS["exp"](a[:3])), a[:3])
    assert OPS["square"](a).tolist() == [4.0, 0.0, 9.0, 10000.0] and OPS["sqrt"](torch.tensor(9.0)) == 3.0
    assert OPS["relu"](-1.5) == 0.0 and OPS["square"](3) == 9.0  # a param or a literal


def test_a_hinge_loss_is_written_with_relu():
    """SNGAN's discriminator loss through the compiled expression equals the hinge written by hand."""
    from genspec.compiler.model import Env, Model

    spec = genspec.load(REPO / "specs" / "zoo" / "sngan.yaml", ["train.device=cpu"])
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    model.train(False)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    env = model.compute(Env(x, None), list(model.node_fns.items()))
    torch.manual_seed(1)
    fake = model.networks["gen"](torch.randn(8, 128))
    d = model.networks["dis"]
    expected = torch.clamp(1 - d(x), min=0).mean() + torch.clamp(1 + d(fake), min=0).mean()
    assert torch.allclose(torch.as_tensor(env["loss:d_loss"]), expected, atol=1e-5)
