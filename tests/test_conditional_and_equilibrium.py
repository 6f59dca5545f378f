"""Issue 7's remaining pieces: networks with condition inputs (CGAN), the categorical latent,
noise injection, CGAN-MBL's Mahalanobis labelling and rebalancing, and BEGAN's declared state k
with its step trace and mode-collapse flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import genspec
from genspec.measure.balance import assign_labels, class_statistics, mahalanobis, rebalanced_weights
from genspec.compiler.model import Env, Model
from genspec.errors import SpecError
from genspec.compiler.ops import TENSOR_OPS, noisy
from genspec.train.trace import collapse_flags
from spec_helpers import REPO, TINY_BEGAN, cli_in_process


def problems_of(path: Path, overrides: list[str]) -> list[str]:
    """The problems of a spec file under --set overrides, without their file:line:column prefix."""
    try:
        genspec.load(path, overrides)
    except SpecError as exc:
        return [str(p).split(": ", 1)[1] for p in exc.problems]
    raise AssertionError("expected a SpecError, but the spec is valid")

BEGAN = REPO / "specs" / "began.yaml"

def tiny_began(tmp_path: Path, overrides=()) -> tuple[Path, object]:
    path = tmp_path / "tiny_began.yaml"
    path.write_text(TINY_BEGAN)
    return path, genspec.load(path, list(overrides))


# ---------------------------------------------------------------- the equilibrium state k

def test_k_follows_the_controller_update_after_every_step(tmp_path):
    _, spec = tiny_began(tmp_path)
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    x = torch.rand(16, 1, 8, 8)
    k = 0.0
    for _ in range(4):
        losses = model.step(model.phases[0], x)
        expected = min(max(k + 0.05 * (0.5 * float(losses["l_real"]) - float(losses["l_fake"])), 0.0), 1.0)
        assert float(losses["state/k"]) == pytest.approx(expected, abs=1e-7)
        assert float(model.states.k) == pytest.approx(expected, abs=1e-7)
        k = expected
    assert k > 0  # untrained fakes reconstruct easily: k grows


@pytest.mark.parametrize("lambda_k, bound", [(100.0, 1.0), (-100.0, 0.0)])
def test_k_is_clamped_to_its_range(tmp_path, lambda_k, bound):
    _, spec = tiny_began(tmp_path, [f"params.lambda_k={lambda_k}"])
    model = Model(spec, torch.device("cpu"))
    model.step(model.phases[0], torch.rand(16, 1, 8, 8))
    assert float(model.states.k) == bound


def test_the_discriminator_loss_reads_k(tmp_path):
    _, spec = tiny_began(tmp_path)
    model = Model(spec, torch.device("cpu"))
    model.states.k.fill_(0.25)
    nodes = [(n, model.node_fns[n]) for n in ("tensor:z_d", "tensor:x_fake", "tensor:h_fake", "tensor:rec_real",
                                              "tensor:rec_fake", "loss:l_real", "loss:l_fake", "loss:d_loss")]
    with torch.no_grad():
        env = model.compute(Env(torch.rand(8, 1, 8, 8)), nodes)
    assert float(env["loss:d_loss"]) == pytest.approx(float(env["loss:l_real"]) - 0.25 * float(env["loss:l_fake"]), rel=1e-6)


def test_state_problems_are_located():
    base = ["state.k.update=k + nowhere"]
    assert problems_of(BEGAN, base) == ["state.k: undefined name 'nowhere'"]
    assert problems_of(BEGAN, ["state.k.init=2"]) == ["state.k.init: init 2 is outside the range [0, 1]"]
    assert problems_of(BEGAN, ["train.trace=[k, nope]"]) == ["train.trace[1]: no loss or state named 'nope'"]
    assert problems_of(BEGAN, ["evaluate.collapse.state=m_global"]) == ["evaluate.collapse.state: no state named 'm_global'"]


def test_a_state_no_phase_can_update_is_an_error():
    # a loss of a tensor no phase computes: the update would never run
    problems = problems_of(BEGAN, ["graph.extra=dec(enc(x_fake))", "losses.l_extra=l1(extra, x_fake)",
                                   "state.k.update=k + l_extra"])
    assert problems == ["state.k.update: no training phase computes what this update reads; "
                        "it may read losses of the objectives that one phase updates"]


def test_collapse_flags_a_sudden_fall_once():
    ks = [0.0, 0.02, 0.05, 0.06, 0.061, 0.02, 0.01, 0.012, 0.05, 0.06]
    history = [{"epoch": i + 1, "trace": {"k": {"mean": k}}} for i, k in enumerate(ks)]
    flags = collapse_flags(history, "k", fall=0.5, window=3)
    assert flags == [{"epoch": 6, "value": 0.02, "peak": 0.061, "peak_epoch": 5}]
    assert collapse_flags(history, "k", fall=0.9, window=3) == []  # 0.02 is not below 10% of 0.061
    assert collapse_flags([{"epoch": 1, "trace": {"k": {"mean": 0.0}}}, {"epoch": 2, "trace": {"k": {"mean": 0.0}}}],
                          "k", 0.5, 3) == []


def test_began_run_traces_k_and_m_global_every_step_and_resumes_exactly(tmp_path):
    path, spec = tiny_began(tmp_path)
    full, half = tmp_path / "full", tmp_path / "half"
    assert cli_in_process("run", path, "--out", full, "--no-progress",
                          "--set", "source={paper: BEGAN v3, reported: {m_global_best: 0.5}}")[0] == 0
    rc, _, err = cli_in_process("run", path, "--out", half, "--no-progress", "--set", "train.epochs=1")
    assert rc == 0, err
    rc, _, err = cli_in_process("run", path, "--out", half, "--no-progress", "--resume")
    assert rc == 0, err
    rows = list(csv.DictReader((full / "trace.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and {r["epoch"] for r in rows} == {"1", "2"}
    assert (half / "trace.csv").read_text() == (full / "trace.csv").read_text()
    history = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    for record in history:
        ks = [float(r["k"]) for r in rows if int(r["epoch"]) == record["epoch"]]
        assert record["trace"]["k"]["last"] == pytest.approx(ks[-1], rel=1e-5)
        assert record["trace"]["m_global"]["mean"] == pytest.approx(
            sum(float(r["m_global"]) for r in rows if int(r["epoch"]) == record["epoch"]) / 4, rel=1e-4)
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    assert float(state["model"]["states"]["k"]) == pytest.approx(float(rows[-1]["k"]), rel=1e-5)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["collapse"]["state"] == "k" and metrics["collapse"]["flags"] == []
    # the paper reports the best checkpoint's M_global: the lowest test value over the epochs
    tests = [record["test"]["m_global"] for record in history]
    assert metrics["best_test"]["m_global"] == min(tests)
    assert metrics["best_test_epoch"]["m_global"] == 1 + tests.index(min(tests))
    report = (full / "report.md").read_text()
    assert f"| m_global_best | 0.5 | {min(tests):.4g} | {min(tests) - 0.5:+.4g} |" in report
    assert "## Convergence" in report and "![trace](trace.png)" in report and (full / "trace.png").is_file()
    assert "no sign of mode collapse" in report


def test_began_cs_and_vae_losses_are_the_papers_equations(tmp_path):
    for name in ("began_cs", "began_vae"):
        spec = genspec.load(REPO / "specs" / f"{name}.yaml")
        text = {k: genspec.lang.expr.to_text(v) for k, v in spec.losses.items()}
        assert text["l_real"] == "mse(rec_real, x)"
        if name == "began_cs":
            assert text["l_c"] == "l2dist(z_d, h_fake)" and text["d_loss"] == "l_real - k * l_fake + alpha * l_c"
        else:
            assert text["l_c"] == "l2dist(z_d, mean_of(q_fake))"
            assert text["d_loss"] == "(l_real - k * l_fake + kl_real - k * kl_fake) / 2 + alpha * l_c"
        assert spec.params["alpha"] == 0.1 and spec.objectives["dis"].networks == ["enc", "dec"]


def test_began_table_has_began_cs_parameter_count():
    spec = genspec.load(BEGAN)
    total = sum(net.info.trainable for net in spec.networks.values())
    assert total == 20_629_318  # the paper's 20,629,320 counts two learning-rate scalars as well


def test_l2dist_is_the_mean_euclidean_distance():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert float(TENSOR_OPS["l2dist"](a, b)) == pytest.approx(float(sum((a[i] - b[i]).norm() for i in range(5)) / 5), rel=1e-6)


# ---------------------------------------------------------------- conditional networks

def test_concat_joins_flat_conditions_and_broadcasts_them_over_images():
    spec = genspec.load(REPO / "specs" / "cgan.yaml")
    gen, dis = spec.networks["gen"], spec.networks["dis"]
    assert gen.info.rows[0].out_shape == (110,) and dis.info.rows[0].out_shape == (11, 28, 28)
    # hand count: conv 11->64 5x5 (+ VBN), conv 64->128 5x5 (+ VBN), fc 6272->1
    assert dis.info.trainable == (11 * 64 * 25 + 64 + 128) + (64 * 128 * 25 + 128 + 256) + (128 * 7 * 7 + 1)
    nets = genspec.build(spec)
    x, label = torch.rand(3, 1, 28, 28), torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    other = torch.nn.functional.one_hot(torch.tensor([4, 5, 6]), 10).float()
    nets["dis"].eval()
    with torch.no_grad():
        assert not torch.allclose(nets["dis"](x, label), nets["dis"](x, other))  # the label matters
        assert nets["gen"](torch.randn(3, 100), label).shape == (3, 1, 28, 28)


def test_condition_inputs_are_checked_where_they_are_called():
    cgan = REPO / "specs" / "cgan.yaml"
    assert problems_of(cgan, ["graph.d_real=dis(x)"]) == ["graph.d_real: network dis takes 2 inputs (input, label), got 1"]
    assert problems_of(cgan, ["graph.d_real=dis(x, x)"]) == ["graph.d_real: dis's label is 10, got 1x28x28"]
    assert problems_of(cgan, ["networks.dis.layers[0]=concat lable"]) == [
        "networks.dis.layers[0]: concat lable: not a condition input of this network; its conditions: label"]
    assert problems_of(cgan, ["networks.gen.condition.label=w"]) == [
        "networks.gen.condition.label: condition 'w' is neither a shape, y (one-hot labels) nor a latent"]
    assert problems_of(cgan, ["latent.c.shape=[2, 5]"])[0].startswith("latent.c.prior: a categorical prior draws one-hot vectors")
    # the gradient penalty calls its critic on images alone: a conditional critic is refused where it is named
    assert problems_of(cgan, ["losses.d_loss=bce(d_real, real) + bce(d_fake, 0) + 10 * gp(dis, x, x_fake)"]) == [
        "losses.d_loss: gp: the critic dis also reads label (a conditional critic); the gradient penalty calls it on "
        "images alone, so give it an unconditional critic"]


def test_categorical_latent_draws_one_hot_labels_by_its_weights():
    spec = genspec.load(REPO / "specs" / "cgan.yaml")
    prior = Model(spec, torch.device("cpu")).priors["c"]
    draws = prior.sample(500, "cpu")
    assert draws.shape == (500, 10) and torch.equal(draws.sum(1), torch.ones(500))
    prior.weights.copy_(torch.tensor([0.0, 0.0, 1.0] + [0.0] * 7))
    assert torch.equal(prior.sample(20, "cpu").argmax(1), torch.full((20,), 2))


def test_discriminator_vbn_reference_is_real_images_with_their_labels():
    from genspec.data.datasets import Split

    spec = genspec.load(REPO / "specs" / "cgan.yaml")
    model = Model(spec, torch.device("cpu"))
    train = Split(torch.rand(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    model.set_references(train)
    dis = model.networks["dis"]
    rows = [int(torch.nonzero((train.x == ref).flatten(1).all(1))[0]) for ref in dis.reference]
    assert torch.equal(dis.reference_1.argmax(1), train.y[rows])  # each reference image with its own label
    assert torch.equal(model.networks["gen"].reference_1.sum(1), torch.ones(64))  # generator: draws of c


def test_noisy_mixes_in_uniform_noise():
    p = torch.full((1000, 1), 0.8, requires_grad=True)
    torch.manual_seed(0)
    out = noisy(p, 0.1)
    assert torch.all((out >= 0.72) & (out <= 0.82))  # 0.9 * 0.8 + 0.1 * u
    out.sum().backward()
    assert torch.allclose(p.grad, torch.full_like(p, 0.9))
    assert torch.equal(noisy(p, 0.0), p)


def test_noise_variant_changes_only_the_discriminator_loss():
    from genspec.report.diff import diff_specs

    result = diff_specs(genspec.load(REPO / "specs" / "cgan" / "smoothing.yaml"), genspec.load(REPO / "specs" / "cgan" / "noise.yaml"))
    paths = {tuple(c["path"]) for c in result["changes"]}
    assert ("losses", "d_loss") in paths and ("losses", "g_loss") not in paths


# ---------------------------------------------------------------- CGAN-MBL's balancing

def gaussian_classes(n: int = 400, seed: int = 0):
    """Three 2-D classes: two elongated along different axes, one round."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    scales = torch.tensor([[3.0, 0.3], [0.3, 3.0], [1.0, 1.0]])
    x = torch.cat([means[k] + scales[k] * torch.randn(n, 2, generator=g) for k in range(3)])
    y = torch.arange(3).repeat_interleave(n)
    return x, y


def test_mahalanobis_labelling_recovers_gaussian_classes():
    x, y = gaussian_classes()
    stats = class_statistics(x, y, 3, shrinkage=1e-3)
    test_x, test_y = gaussian_classes(seed=1)
    accuracy = float((assign_labels(test_x, stats) == test_y).double().mean())
    assert accuracy > 0.95
    # (3, 0) is nearer class 1's mean in Euclidean distance (3 vs 3), but class 0 is stretched along x
    point = torch.tensor([[3.2, 0.0]])
    assert int(assign_labels(point, stats)) == 0
    assert float((point - stats.means[1]).norm()) < float((point - stats.means[0]).norm())


def test_mahalanobis_distance_matches_the_textbook_formula():
    x, y = gaussian_classes()
    stats = class_statistics(x, y, 3, shrinkage=0.1)
    f = torch.randn(4, 2, dtype=torch.float64)
    for k in range(3):
        members = x[y == k].double()
        cov = torch.cov(members.T)
        cov = cov + 0.1 * cov.diagonal().mean() * torch.eye(2, dtype=torch.float64)
        d = f - members.mean(0)
        expected = torch.sqrt(torch.einsum("ni,ij,nj->n", d, torch.linalg.inv(cov), d))
        assert torch.allclose(mahalanobis(f, stats)[:, k], expected)


def test_rebalancing_shifts_weight_to_the_minority_without_abandoning_a_class():
    new = rebalanced_weights(torch.tensor([80, 15, 5]))
    assert new[2] > new[1] > new[0] and float(new.sum()) == pytest.approx(1.0)
    assert torch.allclose(rebalanced_weights(torch.tensor([30, 30, 30])), torch.full((3,), 1 / 3, dtype=torch.float64))
    # a collapsed generator (every image labelled 0): class 0 is drawn least, but never less than half of uniform
    collapsed = rebalanced_weights(torch.tensor([100, 0, 0, 0]))
    assert collapsed[0] == collapsed.min() and float(collapsed.min()) >= 0.5 / 4
    assert torch.allclose(collapsed[1:], collapsed[1:2].expand(3))


def test_balancer_reweights_the_generators_labels_during_a_run(tmp_path, mnist_root):
    out = tmp_path / "run"
    rc, _, err = cli_in_process(
        "run", REPO / "specs" / "cgan_mbl.yaml", "--out", out, "--no-progress", "--set", "train.epochs=2",
        "--set", "train.max_steps=2", "--set", "train.batch_size=32", "--set", f"data.root={mnist_root}",
        "--set", "data.split={train: 200, test: 32}", "--set", "train.balance.samples=100",
        "--set", "evaluate={grids: [samples]}", "--set", "train.device=cpu")
    assert rc == 0, err
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(sum(h["balance"]["counts"]) == 100 for h in history)
    weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]["priors"]["c.weights"]
    assert torch.allclose(weights, torch.tensor(history[-1]["balance"]["weights"]), atol=1e-5)
    assert not torch.allclose(weights, torch.full((10,), 0.1))  # an untrained generator is far from balanced
    assert "## Label balancing (CGAN-MBL)" in (out / "report.md").read_text()


@pytest.fixture
def mnist_root() -> Path:
    import os

    root = os.environ.get("GENSPEC_DATA")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("MNIST is absent: set GENSPEC_DATA to the folder holding MNIST/raw")
    return Path(root)


def test_balance_needs_a_categorical_latent_and_labels():
    mbl = REPO / "specs" / "cgan_mbl.yaml"
    assert problems_of(mbl, ["train.balance.latent=z"]) == ["train.balance.latent: 'z' is not a latent with a categorical prior"]
    assert "train.balance: balancing needs the real class labels (data.labels: true)" in problems_of(
        mbl, ["data.labels=false", "networks.dis.condition.label=c", "graph.d_real=dis(x, c_fake)"])


def test_a_backwards_state_range_is_refused():
    with pytest.raises(SpecError):
        genspec.load(BEGAN, ["state.k.range=[1, 0]"])
    assert "state.k.range: range [1.0, 0.0]: low is above high" in problems_of(BEGAN, ["state.k.range=[1.0, 0.0]"])
