"""Stacked replicas (genspec/experiments/stack.py): the seeds of one configuration trained as one model with a
leading model dimension give the results of separate runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import genspec
from genspec.measure.balance import Balancer
from genspec.experiments.stack import StackedRuns, cannot_stack, train_stacked
from genspec.measure.evaluate import evaluate_losses
from genspec.experiments.run import run
from spec_helpers import NORMED_AUTOENCODER, REPO, TINY_BEGAN, TINY_CONDITIONAL_GAN, TINY_DIGITS_CLASSIFIER, TINY_WGAN_GP

def replicas(path: Path, seeds, extra=()) -> list:
    return [genspec.load(path, [f"train.seed={s}", *extra]) for s in seeds]


def test_stacked_replicas_match_separate_runs(tmp_path):
    """A classifier draws nothing at random in a step: stacked and separate runs agree to float rounding."""
    (tmp_path / "clf.yaml").write_text(TINY_DIGITS_CLASSIFIER)
    specs = replicas(tmp_path / "clf.yaml", (0, 1, 2))
    assert cannot_stack(specs[0]) is None
    stacked = train_stacked(specs, [tmp_path / "stacked" / f"seed{s}" for s in (0, 1, 2)], progress=False)
    for spec, metrics in zip(specs, stacked):
        seed = spec.train["seed"]
        alone = run(spec, out=tmp_path / "alone" / f"seed{seed}", progress=False)
        assert metrics["test"]["nll"] == pytest.approx(alone["test"]["nll"], rel=1e-4)
        assert metrics["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=0.011)
        a = torch.load(tmp_path / "stacked" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "alone" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]
        for key, value in b["networks"].items():
            assert torch.allclose(a["networks"][key], value, atol=1e-4), key
        # each replica's own Adam state, so `--resume` of a stacked run continues like a separate one
        moments = [s["exp_avg"] for s in a["optimizers"]["classifier"]["state"].values()]
        expected = [s["exp_avg"] for s in b["optimizers"]["classifier"]["state"].values()]
        assert all(torch.allclose(m, e, atol=1e-4) for m, e in zip(moments, expected))
        records = [json.loads(line) for line in (tmp_path / "stacked" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2]


def test_the_stacked_step_trains_in_float32_whatever_the_precision(tmp_path):
    """Under vmap, autocast misses most ops (a Linear with a bias stays float32, a bias-free one
    turns bfloat16 and then fails in batch norm against its float32 statistics), so the stacked
    step leaves autocast off: precision bf16 (the default on CUDA) gives float32's losses, and a
    bias-free fc before batch norm steps."""
    (tmp_path / "clf.yaml").write_text(TINY_DIGITS_CLASSIFIER.replace(
        '"fc 32, relu  as features"', '"fc 32 bias=false, bn, relu  as features"'))
    losses = {}
    for precision in ("fp32", "bf16"):
        specs = replicas(tmp_path / "clf.yaml", (0, 1), [f"train.precision={precision}"])
        stacked = StackedRuns(specs, torch.device("cpu"))
        assert stacked.models[0].fast.bf16 is (precision == "bf16")
        xs = torch.stack([s.train.x[:32] for s in stacked.splits])
        ys = torch.stack([s.train.y[:32] for s in stacked.splits])
        losses[precision] = stacked.step(0, xs, ys)["nll"]
    assert losses["bf16"].shape == (2,) and losses["bf16"].dtype == torch.float32
    assert torch.equal(losses["bf16"], losses["fp32"])


def test_specs_that_cannot_stack_say_why(tmp_path):
    (tmp_path / "bn_critic.yaml").write_text(TINY_WGAN_GP.replace("lrelu 0.2, dropout 0.2", "bn, lrelu 0.2"))
    assert cannot_stack(genspec.load(tmp_path / "bn_critic.yaml")) == (
        "the gradient penalty's critic 'dis' has batch norm, whose running statistics cannot be updated inside the "
        "penalty's vjp")
    # a frozen batch norm row keeps its statistics (eval mode): the penalty's vjp writes nothing there
    (tmp_path / "frozen_bn_critic.yaml").write_text(TINY_WGAN_GP.replace("lrelu 0.2, dropout 0.2", "bn, lrelu 0.2, frozen"))
    frozen = genspec.load(tmp_path / "frozen_bn_critic.yaml")
    assert cannot_stack(frozen) is None
    stacked = StackedRuns([frozen, genspec.load(tmp_path / "frozen_bn_critic.yaml", ["train.seed=1"])], torch.device("cpu"))
    for model in stacked.models:
        model.train(True)
    xs = torch.stack([s.train.x[:16] for s in stacked.splits])
    assert torch.isfinite(stacked.step(0, xs, None)["penalty"]).all()
    # batch norm (the VAE-GAN), virtual batch norm (DCGAN) and categorical labels (CGAN) stack
    assert cannot_stack(genspec.load(REPO / "specs" / "cgan.yaml")) is None
    assert cannot_stack(genspec.load(REPO / "specs" / "larsen_vaegan.yaml")) is None
    assert cannot_stack(genspec.load(REPO / "specs" / "dcgan.yaml")) is None
    assert cannot_stack(genspec.load(REPO / "specs" / "wgan_gp.yaml")) is None  # its critic has dropout, no batch norm
    assert cannot_stack(genspec.load(REPO / "specs" / "encoderless" / "mnist_base.yaml")) is None
    # states (BEGAN's k), traces and balancing (CGAN-MBL) stack
    for name in ("began.yaml", "began_cs.yaml", "began_vae.yaml", "cgan_mbl.yaml"):
        assert cannot_stack(genspec.load(REPO / "specs" / name)) is None, name


def test_wgan_gp_replicas_stack_with_the_penalty_in_the_step(tmp_path):
    """The seeds of a WGAN-GP stack: the penalty trains each critic inside the vmapped step (its
    exact gradients: test_gan_family), and every replica ends as a separate run of its seed does,
    up to the noise draws (z, e and dropout differ under vmap)."""
    (tmp_path / "wgan.yaml").write_text(TINY_WGAN_GP)
    specs = replicas(tmp_path / "wgan.yaml", (0, 1, 2))
    assert cannot_stack(specs[0]) is None
    stacked = train_stacked(specs, [tmp_path / "stacked" / f"seed{s}" for s in (0, 1, 2)], progress=False)
    starts = []
    for spec, metrics in zip(specs, stacked):
        seed = spec.train["seed"]
        alone = run(spec, out=tmp_path / "alone" / f"seed{seed}", progress=False)
        records = [json.loads(line) for line in (tmp_path / "stacked" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        starts.append(records[0]["train"]["penalty"])
        assert records[-1]["train"]["penalty"] < records[0]["train"]["penalty"]  # the penalty trained the critic
        assert metrics["test"]["d_loss"] == pytest.approx(alone["test"]["d_loss"], rel=0.02)
        assert metrics["test"]["penalty"] == pytest.approx(alone["test"]["penalty"], rel=0.05)
        a = torch.load(tmp_path / "stacked" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "alone" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]
        assert a["networks"].keys() == b["networks"].keys()
        assert len(a["optimizers"]["dis"]["state"]) == len(b["optimizers"]["dis"]["state"])
    assert len(set(starts)) == 3  # each replica its own seed




@pytest.mark.parametrize("norm", ["bn", "vbn"])
def test_stacked_batch_norm_replicas_match_separate_runs(tmp_path, norm):
    """Each replica normalises with its own batch statistics and keeps its own running statistics
    (bn) or reference batch (vbn): its weights, buffers and eval-mode test loss are a separate run's."""
    (tmp_path / "ae.yaml").write_text(NORMED_AUTOENCODER.replace("NORM", norm))
    specs = replicas(tmp_path / "ae.yaml", (0, 1, 2))
    assert cannot_stack(specs[0]) is None
    stacked = train_stacked(specs, [tmp_path / "stacked" / f"seed{s}" for s in (0, 1, 2)], progress=False)
    buffers = 0
    for spec, metrics in zip(specs, stacked):
        seed = spec.train["seed"]
        alone = run(spec, out=tmp_path / "alone" / f"seed{seed}", progress=False)
        assert metrics["test"]["rec"] == pytest.approx(alone["test"]["rec"], rel=1e-4)
        a = torch.load(tmp_path / "stacked" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]["networks"]
        b = torch.load(tmp_path / "alone" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]["networks"]
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert torch.allclose(a[key].float(), value.float(), atol=1e-4), key
            buffers += key.endswith(("running_mean", "running_var", "num_batches_tracked", "reference"))
        if norm == "bn":
            assert int(a["enc.rows.0.1.num_batches_tracked"]) == 6  # 3 steps in each of 2 epochs
    assert buffers == 3 * (9 if norm == "bn" else 2)
    # the replicas did not share statistics: their running means (or references) differ
    first, second = (torch.load(tmp_path / "stacked" / f"seed{s}" / "checkpoint.pt", weights_only=True)["model"]["networks"]
                     for s in (0, 1))
    key = "enc.rows.0.1.running_mean" if norm == "bn" else "enc.reference"
    assert not torch.allclose(first[key], second[key])


@pytest.mark.parametrize("text", ["classifier", "bn"])
def test_stacked_evaluation_is_each_replicas_own_evaluation(tmp_path, text):
    """The per-epoch test losses of a stacked run come from one vmapped pass over all replicas'
    test batches; with nothing random in the losses they are each replica's evaluate_losses, in
    eval mode (batch norm reads each replica's own running statistics), and training goes on after."""
    (tmp_path / "s.yaml").write_text(TINY_DIGITS_CLASSIFIER if text == "classifier" else NORMED_AUTOENCODER.replace("NORM", "bn"))
    specs = replicas(tmp_path / "s.yaml", (0, 1, 2), ["evaluate.batch_size=24"])  # uneven batches: 64 = 24 + 24 + 16
    stacked = StackedRuns(specs, torch.device("cpu"))
    for step in range(3):  # move the weights and running statistics away from their start
        xs = torch.stack([s.train.x[step * 32:(step + 1) * 32] for s in stacked.splits])
        ys = None if stacked.splits[0].train.y is None else torch.stack([s.train.y[step * 32:(step + 1) * 32] for s in stacked.splits])
        stacked.step(0, xs, ys)
    together = stacked.evaluate()
    stacked.unstack()
    alone = [evaluate_losses(spec, model, splits.test) for spec, model, splits in zip(specs, stacked.models, stacked.splits)]
    assert len({round(a[next(iter(a))], 6) for a in alone}) == 3  # three different replicas
    for t, a in zip(together, alone):
        assert t.keys() == a.keys()
        for name, value in a.items():
            assert t[name] == pytest.approx(value, rel=1e-5), name
    assert all(model.networks.training for model in stacked.models)


def test_stacked_categorical_draws_follow_each_replicas_own_class_weights(tmp_path):
    """A categorical prior's class weights are a buffer: stacked, each replica draws from its own,
    independently of the others; a small conditional GAN then trains stacked to the end."""
    from torch.func import functional_call, vmap

    from genspec.experiments.stack import StackedRuns

    (tmp_path / "cgan.yaml").write_text(TINY_CONDITIONAL_GAN)
    specs = replicas(tmp_path / "cgan.yaml", (0, 1))
    assert cannot_stack(specs[0]) is None
    stacked = StackedRuns(specs, torch.device("cpu"))
    weights = stacked.buffers["priors.c.weights"]
    weights[1] = torch.tensor([0.55] + [0.05] * 9)
    prior = stacked.models[0].priors["c"]
    draws = vmap(lambda w: functional_call(_Sampler(prior), {"prior.weights": w}, ()), randomness="different")(weights)
    shares = draws.mean(1)
    assert torch.allclose(shares[0], torch.full((10,), 0.1), atol=0.02)
    assert torch.allclose(shares[1], weights[1], atol=0.02)
    assert draws.sum(-1).eq(1).all()
    metrics = train_stacked(specs, [tmp_path / f"seed{s}" for s in (0, 1)], progress=False)
    assert all(set(m["test"]) == {"d_loss", "g_loss"} for m in metrics)
    assert metrics[0]["test"] != metrics[1]["test"]


class _Sampler(torch.nn.Module):
    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self):
        return self.prior.sample(4000, "cpu")


def test_each_stacked_replica_reads_and_updates_its_own_state(tmp_path):
    """BEGAN's k stacks as a buffer: each replica's discriminator loss reads its own k, and after
    the step its k is clamp(k + lambda_k (gamma L(x) - L(G(z))), 0, 1) of its own losses, exactly
    as `Model.update_states` of a single run computes it."""
    (tmp_path / "began.yaml").write_text(TINY_BEGAN)
    specs = replicas(tmp_path / "began.yaml", (0, 1, 2))
    assert cannot_stack(specs[0]) is None
    stacked = StackedRuns(specs, torch.device("cpu"))
    for model in stacked.models:
        model.train(True)
    k = torch.tensor([0.25, 0.75, 0.0])
    stacked.buffers["states.k"].copy_(k)
    for _ in range(3):
        xs = torch.stack([s.train.x[:16] for s in stacked.splits])
        out = stacked.step(0, xs, None)
        assert torch.allclose(out["objective/dis"], out["l_real"] - k * out["l_fake"], atol=1e-6)
        k = (k + 0.05 * (0.5 * out["l_real"] - out["l_fake"])).clamp(0, 1)
        assert torch.allclose(out["state/k"], k, atol=1e-7) and torch.equal(stacked.buffers["states.k"], out["state/k"])
    assert len(set(k.tolist())) == 3
    stacked.unstack()
    assert [float(m.states.k) for m in stacked.models] == k.tolist()


def test_stacked_began_writes_each_runs_trace_and_state(tmp_path):
    """A stacked BEGAN study writes what separate runs write: each folder its own trace.csv with a
    single run's step numbers, per-epoch trace summaries, k in the checkpoint and the collapse check."""
    (tmp_path / "began.yaml").write_text(TINY_BEGAN)
    specs = replicas(tmp_path / "began.yaml", (0, 1))
    train_stacked(specs, [tmp_path / "stacked" / f"seed{s}" for s in (0, 1)], progress=False)
    run(specs[0], out=tmp_path / "alone", progress=False)
    alone_rows = list(csv.DictReader((tmp_path / "alone" / "trace.csv").open()))
    lasts = []
    for seed in (0, 1):
        folder = tmp_path / "stacked" / f"seed{seed}"
        rows = list(csv.DictReader((folder / "trace.csv").open()))
        assert [(r["step"], r["epoch"]) for r in rows] == [(r["step"], r["epoch"]) for r in alone_rows]
        assert rows[0].keys() == alone_rows[0].keys() == {"step", "epoch", "k", "m_global"}
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for record in history:
            ks = [float(r["k"]) for r in rows if int(r["epoch"]) == record["epoch"]]
            assert record["trace"]["k"]["last"] == pytest.approx(ks[-1], rel=1e-5)
            assert record["trace"]["k"]["mean"] == pytest.approx(sum(ks) / len(ks), rel=1e-5)
        state = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]["states"]
        assert float(state["k"]) == pytest.approx(float(rows[-1]["k"]), rel=1e-5) and float(state["k"]) > 0
        lasts.append(rows[-1]["k"])
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["collapse"]["state"] == "k"
        assert "![trace](trace.png)" in (folder / "report.md").read_text() and (folder / "trace.png").is_file()
    assert lasts[0] != lasts[1]  # each replica its own k


def test_stacked_balancing_reweights_each_replicas_own_labels(tmp_path):
    """CGAN-MBL's balancing stacks: after each epoch every replica labels its own generator's
    images and its new label weights go back into its slice of the stacked prior, which the next
    epoch draws from; each run logs and keeps its own weights."""
    text = TINY_CONDITIONAL_GAN.replace(
        "train: {epochs: 1,", "train: {balance: {latent: c, images: x_fake, samples: 200}, epochs: 2,")
    (tmp_path / "cgan.yaml").write_text(text)
    specs = replicas(tmp_path / "cgan.yaml", (0, 1))
    assert specs[0].train["balance"]["every"] == 1
    assert cannot_stack(specs[0]) is None
    train_stacked(specs, [tmp_path / f"seed{s}" for s in (0, 1)], progress=False)
    finals = []
    for seed in (0, 1):
        history = [json.loads(line) for line in (tmp_path / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [sum(h["balance"]["counts"]) for h in history] == [200, 200]
        weights = torch.load(tmp_path / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]["priors"]["c.weights"]
        assert torch.allclose(weights, torch.tensor(history[-1]["balance"]["weights"]), atol=1e-5)
        assert not torch.allclose(weights, torch.full((10,), 0.1))
        finals.append(weights)
    assert not torch.allclose(finals[0], finals[1])  # each replica labels its own generator


def test_rebalancing_writes_each_replicas_new_weights_into_its_stacked_slice(tmp_path):
    """The next epoch's vmapped draws read the stacked prior buffers (tested above), so each
    replica's new label weights must land in its own slice of them."""
    text = TINY_CONDITIONAL_GAN.replace("train: {epochs: 1,", "train: {balance: {latent: c, images: x_fake, samples: 200}, epochs: 1,")
    (tmp_path / "cgan.yaml").write_text(text)
    specs = replicas(tmp_path / "cgan.yaml", (0, 1))
    stacked = StackedRuns(specs, torch.device("cpu"))
    balancers = [Balancer(s, m, sp.train) for s, m, sp in zip(specs, stacked.models, stacked.splits)]
    logs = stacked.rebalance(balancers)
    for r, (model, log) in enumerate(zip(stacked.models, logs)):
        assert torch.equal(stacked.buffers["priors.c.weights"][r], model.priors["c"].weights)
        assert not torch.allclose(model.priors["c"].weights, torch.full((10,), 0.1))
        assert model.priors["c"].weights.tolist() == pytest.approx(log["weights"], abs=1e-5)


def test_stacked_runs_out_of_memory_suggest_unstacking(monkeypatch, tmp_path):
    import genspec.experiments.stack
    from genspec.errors import RunError
    from genspec.graph.pipeline import load_spec
    from spec_helpers import QUICKSTART

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(genspec.experiments.stack, "_train_stacked", out_of_memory)
    spec = load_spec(QUICKSTART)
    with pytest.raises(RunError, match=r"or --no-stack \(this trains 3 runs at once\); running the study again resumes"):
        genspec.experiments.stack.train_stacked([spec] * 3, [tmp_path / str(i) for i in range(3)])
