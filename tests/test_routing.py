"""Routing across phases: one network trained by several objectives, each with its own optimiser,
in different phases (the adversarial autoencoder's encoder: reconstruction, then as the generator
of the regularisation phase). No phase may update two objectives that train the same network."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import genspec
from genspec.compiler.model import Model
from genspec.experiments.stack import StackedRuns, cannot_stack
from spec_helpers import REPO, check, cli_in_process, problems_of

AAE = REPO / "specs" / "zoo" / "aae.yaml"
AAE_TEXT = AAE.read_text()
AAE_PHASES = "  phases: [{update: [ae]}, {update: [disc], batch: same}, {update: [enc_gen], batch: same}]\n"
# 6 steps an epoch on a small split: seconds, no image grids
QUICK = ["train.device=cpu", "data.split.train=192", "data.split.test=64", "train.batch_size=32", "evaluate.grids=[]"]


def aae_with_phases(line: str) -> str:
    assert AAE_TEXT.count(AAE_PHASES) == 1
    return AAE_TEXT.replace(AAE_PHASES, line)


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


# ---------------------------------------------------------------- validation

def test_the_aae_trains_its_encoder_with_two_objectives_in_different_phases():
    spec = check(AAE_TEXT, "aae.yaml")
    assert spec.objectives["ae"].networks == ["enc", "dec"] and spec.objectives["enc_gen"].networks == ["enc"]
    assert [p.update for p in spec.phases] == [["ae"], ["disc"], ["enc_gen"]]


def test_two_objectives_of_one_phase_may_not_train_the_same_network():
    text = aae_with_phases("  phases: [{update: [ae, enc_gen]}, {update: [disc], batch: same}]\n")
    line = line_of(text, "phases: [{update: [ae, enc_gen]}")
    assert problems_of(text, "aae.yaml") == [
        f"aae.yaml:{line}:{text.splitlines()[line - 1].index('enc_gen') + 1}: train.phases[0].update[1]: phase 1 "
        "updates objectives 'ae' and 'enc_gen', which both train network 'enc': one step would add their gradients "
        "and step it with both optimisers; give 'enc_gen' a phase of its own (e.g. {update: [enc_gen], batch: same})"]


def test_without_phases_the_one_default_phase_updates_every_objective():
    text = aae_with_phases("")
    line = line_of(text, "enc_gen: {networks: [enc]")
    column = text.splitlines()[line - 1].index("[enc]") + 2  # the list item `enc`
    assert problems_of(text, "aae.yaml") == [
        f"aae.yaml:{line}:{column}: objectives.enc_gen.networks[0]: objectives 'ae' and 'enc_gen' both train network "
        "'enc', and without train.phases one phase updates every objective: one step would add their gradients and "
        "step it with both optimisers; give each a phase of its own, e.g. phases: [{update: [ae]}, "
        "{update: [enc_gen], batch: same}]"]


def test_the_same_objective_in_two_phases_is_not_a_clash():
    spec = check(aae_with_phases("  phases: [{update: [ae]}, {update: [disc, enc_gen]}, {update: [ae]}]\n"))
    assert [p.update for p in spec.phases] == [["ae"], ["disc", "enc_gen"], ["ae"]]


def test_every_trainable_network_still_needs_an_objective():
    text = AAE_TEXT.replace("  disc: {minimize: d_loss, optimizer: \"adam(lr_adv, betas=[0.5, 0.999])\"}\n", "")
    text = text.replace("{update: [disc], batch: same}, ", "")
    assert any("network 'disc' has 17793 trainable parameters but no objective trains it" in p for p in problems_of(text))


def test_show_lists_both_objectives_of_the_encoder():
    rc, out, err = cli_in_process("show", AAE)
    assert rc == 0, err
    table = out[out.index("optimisers"):].splitlines()
    rows = {line.split()[0]: line for line in table[3:] if line.strip()}
    assert rows["ae"].split()[2:4] == ["enc,", "dec"] and rows["enc_gen"].split()[2] == "enc"
    rc, out, err = cli_in_process("show", AAE, "--json")
    shown = json.loads(out)["objectives"]
    assert [name for name, o in shown.items() if "enc" in o["networks"]] == ["ae", "enc_gen"]


# ---------------------------------------------------------------- the compiled model

@pytest.fixture()
def model_and_batch():
    spec = genspec.load(AAE, ["train.device=cpu"])
    torch.manual_seed(0)
    model = Model(spec, torch.device("cpu"))
    x = torch.rand(32, 1, 8, 8)
    return model, x


def parameters(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.networks.named_parameters()}


def changed(before: dict, after: dict) -> set[str]:
    """The networks whose parameters differ."""
    return {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}


def optimiser_state(model: Model, objective: str) -> dict:
    return {i: {k: v.clone() for k, v in s.items()} for i, s in model.objectives[objective].optimizer.state_dict()["state"].items()}


def test_each_phase_steps_only_its_own_objectives_optimiser(model_and_batch):
    model, x = model_and_batch
    start = parameters(model)
    model.step(model.phases[0], x)  # reconstruction: the encoder and decoder
    after_ae = parameters(model)
    assert changed(start, after_ae) == {"enc", "dec"}
    assert optimiser_state(model, "enc_gen") == {} and optimiser_state(model, "disc") == {}
    ae_state = optimiser_state(model, "ae")

    model.step(model.phases[1], x)  # the discriminator, on prior draws and the (detached) codes
    after_disc = parameters(model)
    assert changed(after_ae, after_disc) == {"disc"}

    model.step(model.phases[2], x)  # the encoder as generator, with its own optimiser
    after_gen = parameters(model)
    assert changed(after_disc, after_gen) == {"enc"}
    state = optimiser_state(model, "ae")  # the reconstruction optimiser's moments are untouched
    assert state.keys() == ae_state.keys()
    assert all(torch.equal(state[i][k], ae_state[i][k]) for i in state for k in state[i])
    # enc_gen's first Adam step moves each weight by about its lr (m / sqrt(v) = sign of the gradient), not
    # by the reconstruction optimiser's lr of 1e-3: its own, fresh moments took the step
    step = torch.cat([(after_gen[k] - after_disc[k]).abs().flatten() for k in after_gen if k.startswith("enc.")])
    lr = model.spec.params["lr_adv"]
    moved = step[step > 0]  # the weights of dead ReLU units get no gradient and stay
    assert moved.numel() > 0.5 * step.numel() and moved.max().item() == pytest.approx(lr, rel=1e-3)
    assert (moved > 0.9 * lr).float().mean() > 0.99
    gen_steps = {int(s["step"]) for s in optimiser_state(model, "enc_gen").values()}
    assert gen_steps == {1} and {int(s["step"]) for s in state.values()} == {1}


def test_the_generator_phase_moves_the_encoder_by_the_adversarial_gradient_alone(model_and_batch):
    """Phase 3's step is a fresh Adam step on g_loss's gradient alone, made by hand on a copy of
    the encoder: no reconstruction gradient of phase 1 is left in the encoder's .grad."""
    model, x = model_and_batch
    model.step(model.phases[0], x)
    by_hand = copy.deepcopy(model.networks["enc"])
    adam = torch.optim.Adam(by_hand.parameters(), lr=model.spec.params["lr_adv"], betas=(0.5, 0.999))
    g_loss = F.binary_cross_entropy(model.networks["disc"](by_hand(x)), torch.ones(len(x), 1))
    g_loss.backward(inputs=list(by_hand.parameters()))
    adam.step()
    model.step(model.phases[2], x)
    for (name, p), q in zip(model.networks["enc"].named_parameters(), by_hand.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


# ---------------------------------------------------------------- runs, resume, stacking

def run_spec(out: Path, *overrides: str, resume: bool = False) -> None:
    args = ["run", AAE, "--out", out, "--no-progress", *(["--resume"] if resume else [])]
    rc, _, err = cli_in_process(*args, *[a for o in (*QUICK, *overrides) for a in ("--set", o)])
    assert rc == 0, err


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def aae_runs(tmp_path_factory):
    """(a 2-epoch run, the same run made of 1 epoch then --resume to 2)."""
    base = tmp_path_factory.mktemp("aae")
    run_spec(base / "full", "train.epochs=2")
    run_spec(base / "part", "train.epochs=1")
    run_spec(base / "part", "train.epochs=2", resume=True)
    return base / "full", base / "part"


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def test_a_run_trains_the_encoder_in_both_phases(aae_runs):
    full, _ = aae_runs
    history = records(full)
    assert history[0]["updates"] == {"enc": 12, "dec": 6, "disc": 6}  # 192 / 32 batches, the encoder twice each
    assert history[1]["test"]["rec"] < history[0]["test"]["rec"]
    state = checkpoint(full)["optimizers"]
    assert set(state) == {"ae", "disc", "enc_gen"}
    for objective in ("ae", "enc_gen"):
        assert {int(s["step"]) for s in state[objective]["state"].values()} == {12}


def test_resume_restores_both_optimisers_of_the_encoder(aae_runs):
    full, part = (checkpoint(folder) for folder in aae_runs)
    for objective in ("ae", "disc", "enc_gen"):
        a, b = full["optimizers"][objective]["state"], part["optimizers"][objective]["state"]
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in ("exp_avg", "exp_avg_sq", "step")), objective
    assert all(torch.equal(full["networks"][k], part["networks"][k]) for k in full["networks"])
    assert [r["test"] for r in records(aae_runs[0])] == [r["test"] for r in records(aae_runs[1])]


def test_stacked_replicas_share_the_encoder_between_two_optimisers_as_separate_runs_do():
    """Phases 1 and 3 draw nothing at random: stacked and separate steps agree to float rounding."""
    specs = [genspec.load(AAE, ["train.device=cpu", f"train.seed={s}"]) for s in (0, 1)]
    assert cannot_stack(specs[0]) is None
    stacked = StackedRuns(specs, torch.device("cpu"))
    alone = []
    for spec in specs:
        torch.manual_seed(spec.train["seed"])  # as StackedRuns builds each replica
        alone.append(Model(spec, torch.device("cpu")))
    xs = torch.stack([s.train.images(torch.arange(32)) for s in stacked.splits])
    for phase in (0, 2, 0, 2):
        stacked.step(phase, xs, None)
        for r, model in enumerate(alone):
            model.step(model.phases[phase], xs[r])
    stacked.unstack()
    for r, model in enumerate(alone):
        for (name, p), q in zip(model.networks.named_parameters(), stacked.models[r].networks.parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
        for objective in ("ae", "enc_gen"):
            a = model.objectives[objective].optimizer.state_dict()["state"]
            b = stacked.models[r].objectives[objective].optimizer.state_dict()["state"]
            assert a.keys() == b.keys()
            assert all(torch.allclose(a[i]["exp_avg"], b[i]["exp_avg"], atol=1e-6) for i in a), objective


def test_under_nproc_a_network_of_two_objectives_has_one_wrapper(monkeypatch):
    """Both of the encoder's objectives reduce through one DDP wrapper, the one phases 1 and 3
    call it through (a second would hook the same parameters again)."""
    from genspec.compiler import distributed

    wrapped = []
    monkeypatch.setattr(distributed, "wrap", lambda module, device: wrapped.append(module) or object())
    spec = genspec.load(AAE, ["train.device=cpu"])
    model = Model(spec, torch.device("cpu"), distributed.World(rank=0, size=2))
    assert [m is model.networks[n] for m, n in zip(wrapped, ("enc", "dec", "disc"))] == [True] * 3 and len(wrapped) == 3
    assert [net for net, _ in model.objectives["ae"].wrapped] == ["enc", "dec"]
    assert [net for net, _ in model.objectives["enc_gen"].wrapped] == ["enc"]
    assert model.phases[0].callers["enc"] is model.phases[2].callers["enc"] is model.wrappers["enc"]
    assert "enc" not in model.phases[1].callers  # the discriminator's phase reads the codes through the raw encoder

