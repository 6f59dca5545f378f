"""`genspec run --nproc N`: data-parallel training in N processes (gloo on this CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import genspec
from genspec.cli import _without_nproc
from genspec.compiler.distributed import SINGLE, World, shard
from genspec.errors import RunError
from genspec.experiments.run import run
from spec_helpers import REPO, TINY_DIGITS_CLASSIFIER, cli_env, cli_in_process, run_cli, tiny_gan_doc
from test_conditional_and_equilibrium import TINY_BEGAN

QUICKSTART = str(REPO / "specs" / "quickstart.yaml")


def test_two_gloo_processes_train_like_one(tmp_path):
    sets = ["--set", "train.epochs=2", "--set", "train.device=cpu"]
    single = run_cli(["run", QUICKSTART, "--out", str(tmp_path / "one"), "--no-progress", *sets], timeout=120)
    assert single.returncode == 0, single.stderr
    double = run_cli(["run", QUICKSTART, "--out", str(tmp_path / "two"), "--no-progress", "--nproc", "2", *sets], timeout=300)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("quickstart: done") == 1  # rank 0 reports; rank 1 stays quiet
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by rank 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]
    # the same global batch of 64, split 32 + 32, gradients averaged: the same training up to noise draws
    assert two["elbo"] == pytest.approx(one["elbo"], rel=0.03)
    assert two["elbo"] != one["elbo"]  # each rank draws its own noise
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and not list((tmp_path / "two").glob("*.tmp"))
    assert len(state["rank_rng"]) == 2 and not torch.equal(state["rank_rng"][0]["cpu"], state["rank_rng"][1]["cpu"])

    # 1 epoch, then --resume to 2: every rank continues its own saved stream, so the same run
    part = ["run", QUICKSTART, "--out", str(tmp_path / "part"), "--no-progress", "--nproc", "2", "--set", "train.device=cpu"]
    first = run_cli([*part, "--set", "train.epochs=1"], timeout=300)
    assert first.returncode == 0, first.stderr
    resumed = run_cli([*part, "--set", "train.epochs=2", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "random streams" not in resumed.stderr  # no fresh-draw warning: as many processes as saved
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["test"] == two
    resumed_state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for name, tensor in state["model"]["networks"].items():
        assert torch.equal(resumed_state["model"]["networks"][name], tensor), name


def test_bad_nproc_is_refused_before_anything_runs(tmp_path):
    rc, _, err = cli_in_process("run", QUICKSTART, "--out", tmp_path / "run", "--nproc", "0")
    assert rc == 1 and "--nproc must be a positive number of processes, got 0" in err
    assert not (tmp_path / "run").exists()


def test_a_batch_too_small_to_share_is_refused_before_anything_launches(tmp_path):
    rc, _, err = cli_in_process("run", QUICKSTART, "--out", tmp_path / "run", "--nproc", "3",
                                "--set", "train.batch_size=2")
    assert rc == 1 and "train.batch_size 2 over 3 processes: 1 of them would get no example" in err
    assert "launching" not in err and not (tmp_path / "run").exists()
    spec_path = tmp_path / "bn.yaml"  # batch norm: each process's share needs two examples
    doc = tiny_gan_doc("bn_gan", 1e-3, [{"update": ["dis"]}, {"update": ["gen"]}])
    doc["networks"]["gen"]["layers"][0] = "fc 32, bn, relu"
    spec_path.write_text(json.dumps(doc))
    rc, _, err = cli_in_process("run", spec_path, "--out", tmp_path / "run", "--nproc", "2",
                                "--set", "train.batch_size=3")
    assert rc == 1 and ("train.batch_size 3 over 2 processes: batch norm (in networks.gen) needs 2 examples in each "
                        "process's share; use --set train.batch_size=4 or more") in err
    assert not (tmp_path / "run").exists()


def test_every_rank_of_an_outer_torchrun_refuses_a_batch_too_small_to_share(tmp_path, monkeypatch):
    spec = genspec.load(QUICKSTART, ["train.batch_size=2"])
    for rank in range(3):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(RunError, match="1 of them would get no example"):
            run(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_processes_than_gpus_stop_every_rank_with_one_message(monkeypatch):
    """On a one-GPU machine `--nproc 2` would have rank 1 ask for cuda:1 (and NCCL refuses two
    ranks on one GPU): every rank stops before touching a device or the process group."""
    from genspec.compiler.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    for rank in (0, 1):
        with pytest.raises(RunError, match=r"2 processes on this machine but 1 GPU: each process needs a GPU of its "
                                           r"own; use --nproc 1 or fewer, or --set train.device=cpu"):
            setup(World(rank, 2, rank, local_size=2), "auto")


def test_each_rank_takes_its_slice_of_the_global_batch():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    assert shard(x, y, SINGLE)[0] is x
    parts = [shard(x, y, World(rank, 3, rank)) for rank in range(3)]
    assert sorted(int(v) for part, _ in parts for v in part.flatten()) == list(range(10))
    assert torch.equal(parts[1][1], torch.tensor([1, 4, 7]))


def test_launched_processes_get_the_command_without_nproc():
    assert _without_nproc(["run", "a.yaml", "--nproc", "2", "--set", "x=1"]) == ["run", "a.yaml", "--set", "x=1"]
    assert _without_nproc(["run", "a.yaml", "--nproc=4"]) == ["run", "a.yaml"]


# ---------------------------------------------------------------- DDP wrappers, rank by rank
#
# Two gloo ranks spawned here run genspec's own start (train.prepare) and epochs (train._one_epoch)
# on small specs, every spec in one spawn (a torch import per rank is most of the time), and hand
# back their parameters. Ranks that start equal, see different slices and noise, and end equal
# had every gradient averaged.

TINY_VAEGAN = """\
genspec: 1
name: tiny_vaegan
params: {gamma: 1.0, lr: 1.0e-3}
data: {dataset: digits, range: [-1, 1], split: {train: 256, test: 64}}
latent: {z: {shape: [4], prior: normal}}
networks:
  enc: {input: x, layers: [flatten, "fc 32, relu", gaussian 4]}
  dec: {input: z, layers: ["fc 32, relu", "fc 64, tanh", reshape 1 8 8]}
  dis: {input: x, layers: [flatten, "fc 32, lrelu 0.2  as features", "fc 1, sigmoid"]}
labels:
  real: {value: 0.95, swap: 0.05, other: 0.05}
  fake: {value: 0.05, swap: 0.05, other: 0.95}
graph:
  q: enc(x)
  z: rsample(q)
  x_rec: dec(z)
  x_p: dec(sample(z))
  d_real: dis(x)
  d_rec: dis(x_rec)
  d_p: dis(x_p)
losses:
  prior: kl(q, z)
  llike: sqerr(dis.features(x_rec), dis.features(x)) / 2
  gan: bce(d_real, real) + bce(d_rec, fake) + bce(d_p, fake)
objectives:
  enc: {minimize: prior + llike, optimizer: adam(lr)}
  dec: {minimize: gamma * llike - gan, optimizer: adam(lr)}
  dis: {minimize: gan, optimizer: adam(lr)}
train: {epochs: 2, batch_size: 32, seed: 0, device: cpu, phases: [{update: [enc, dec, dis]}]}
evaluate: {losses: [prior, llike, gan], grids: {}}
"""

# WGAN-GP's two phases with the penalty, a critic frozen but for its last row, a frozen feature
# network in the generator's loss and a RealNVP prior trained with the generator.
TINY_WGAN_GP_FLOW = """\
genspec: 1
name: tiny_wgan_gp_flow
params: {lr: 1.0e-3}
data: {dataset: digits, range: [-1, 1], split: {train: 128, test: 32}}
latent: {z: {shape: [4], prior: "realnvp(flows=2, hidden=8)"}}
networks:
  gen: {input: z, layers: ["fc 32, relu", "fc 64, tanh", reshape 1 8 8]}
  dis: {input: x, freeze: all_but_last, layers: [flatten, "fc 32, lrelu 0.2", "fc 16, lrelu 0.2", fc 1]}
  feat: {input: x, freeze: true, layers: [flatten, "fc 8, relu"]}
graph:
  x_fake: gen(sample(z))
  d_real: dis(x)
  d_fake: dis(x_fake)
losses:
  d_loss: mean(d_fake) - mean(d_real) + 10 * gp(dis, x, x_fake)
  g_loss: -mean(d_fake) + sqerr(feat(x_fake), feat(x))
objectives:
  dis: {minimize: d_loss, optimizer: adam(lr)}
  gen: {networks: [gen, z], minimize: g_loss, optimizer: adam(lr)}
train: {epochs: 1, batch_size: 32, seed: 0, device: cpu, phases: [{update: [dis], repeat: 2}, {update: [gen]}]}
evaluate: {losses: [d_loss, g_loss], grids: {}}
"""

# Two networks, two objectives, one phase: the probe's loss is made not to require grad (the step
# skips its backward pass while its wrapper was called).
TWO_CLASSIFIERS = """\
genspec: 1
name: two_classifiers
data: {dataset: digits, labels: true, split: {train: 128, test: 32}}
networks:
  classifier: {input: x, layers: [flatten, "fc 16, relu", "fc 10, log_softmax"]}
  probe: {input: x, layers: [flatten, "fc 10, log_softmax"]}
graph:
  logp: classifier(x)
  logq: probe(x)
losses:
  nll: nll(logp, y)
  probe_nll: nll(logq, y)
objectives:
  classifier: {minimize: nll, optimizer: adam(1e-2)}
  probe: {minimize: probe_nll, optimizer: adam(1e-2)}
train: {epochs: 1, batch_size: 32, seed: 0, device: cpu}
evaluate: {losses: [nll], grids: {}}
"""

# The objective reads only the tap `h`: the last row's parameters never get a gradient.
UNREACHED = """\
genspec: 1
name: unreached
data: {dataset: digits, split: {train: 128, test: 32}}
networks:
  enc: {input: x, layers: [flatten, "fc 16, relu  as h", "fc 4"]}
graph:
  code: enc(x)
losses:
  act: mean(enc.h(x))
objectives:
  enc: {minimize: act, optimizer: adam(1e-3)}
train: {epochs: 1, batch_size: 32, seed: 0, device: cpu}
evaluate: {losses: [act], grids: {}}
"""

RANK_CASES = {  # name -> (spec text, --set overrides, objectives whose loss is detached)
    "classifier": (TINY_DIGITS_CLASSIFIER, ["train.seed=0"], []),
    "vaegan": (TINY_VAEGAN, ["train.epochs=1", "train.max_steps=4"], []),
    "wgan_gp_flow": (TINY_WGAN_GP_FLOW, [], []),
    "began": (TINY_BEGAN, ["train.epochs=1", "train.max_steps=3"], []),
    "no_grad_loss": (TWO_CLASSIFIERS, [], ["probe"]),
    "unreached": (UNREACHED, [], []),  # last: it leaves its reducers mid-step
}


def _counting_allreduce(count, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count[0] += 1
    return allreduce_hook(None, bucket)  # DDP's own averaging, counted


def _snapshot(model) -> dict:
    return {f"{part}.{k}": v.detach().clone() for part, module in
            (("networks", model.networks), ("priors", model.priors), ("states", model.states))
            for k, v in module.state_dict().items()}


def _train_case(path: str, overrides: list, detached: list, world) -> dict:
    """One spec on this rank as `genspec run` trains it (without the folder); or the RunError."""
    from genspec.train.loop import _one_epoch, prepare

    spec = genspec.load(path, overrides)
    try:
        splits, model = prepare(spec, world)
        start = _snapshot(model)
        reduced = {}
        for name, wrapper in model.wrappers.items():
            reduced[name] = [0]
            wrapper.register_comm_hook(reduced[name], _counting_allreduce)
        for name in detached:
            loss = model.objectives[name].loss
            model.objectives[name].loss = lambda env, loss=loss: loss(env).detach()
        for epoch in range(1, spec.train["epochs"] + 1):
            _one_epoch(spec, model, splits, epoch, None, world=world)
    except RunError as exc:
        return {"error": str(exc)}
    return {"start": start, "end": _snapshot(model), "reduced": {k: v[0] for k, v in reduced.items()},
            "wrappers": {k: type(w).__name__ for k, w in model.wrappers.items()},
            "ddp": all(isinstance(w, DistributedDataParallel) for w in model.wrappers.values()),
            "callers": [sorted(phase.callers) for phase in model.phases],
            "callers_are_wrappers": all(phase.callers[k] is model.wrappers[k] for phase in model.phases for k in phase.callers)}


def _rank_worker(rank: int, size: int, store: str, cases: dict, out: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)  # two ranks on two cores
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    world = World(rank, size, rank)
    results = {name: _train_case(path, overrides, detached, world) for name, (path, overrides, detached) in cases.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each case trained by two spawned gloo ranks: [rank 0's results, rank 1's], and the spec files."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("ranks")
    cases = {}
    for name, (text, overrides, detached) in RANK_CASES.items():
        (folder / f"{name}.yaml").write_text(text)
        cases[name] = (str(folder / f"{name}.yaml"), overrides, detached)
    context = mp.start_processes(_rank_worker, args=(2, str(folder / "store"), cases, str(folder)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish in 300 s (a collective left waiting?)")
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results, cases


def _assert_same(a: dict, b: dict, exact: bool = True, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], msg=key, **tol)


def _changed(result: dict, prefix: str) -> bool:
    keys = [k for k in result["start"] if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(result["start"][k], result["end"][k]) for k in keys)


def test_ddp_wrappers_average_like_one_process_on_the_global_batch(ranks):
    from genspec.train.loop import _one_epoch, prepare

    (r0, r1), cases = ranks
    for r in (r0, r1):
        assert r["classifier"]["ddp"] and r["classifier"]["wrappers"] == {"classifier": "DistributedDataParallel"}
        assert r["classifier"]["callers"] == [["classifier"]] and r["classifier"]["callers_are_wrappers"]
        assert r["classifier"]["reduced"]["classifier"] >= 8  # DDP's reducer all-reduced at every one of the 8 steps
    _assert_same(r0["classifier"]["end"], r1["classifier"]["end"])  # identical on both ranks, bit for bit
    assert _changed(r0["classifier"], "networks.classifier")
    # One process on the whole global batch of 64 (each rank had 32 of it): the same training.
    path, overrides, _ = cases["classifier"]
    spec = genspec.load(path, overrides)
    splits, model = prepare(spec)
    assert not model.wrappers  # one process: no wrapper, the raw networks
    for epoch in range(1, spec.train["epochs"] + 1):
        _one_epoch(spec, model, splits, epoch, None)
    _assert_same(_snapshot(model), r0["classifier"]["end"], exact=False, rtol=1e-4, atol=1e-5)


def test_three_objectives_from_one_forward_average_every_network(ranks):
    (r0, r1), _ = ranks
    result = r0["vaegan"]
    assert result["wrappers"] == {n: "DistributedDataParallel" for n in ("enc", "dec", "dis")}
    assert result["callers"] == [["dec", "dis", "enc"]]
    assert all(count >= 4 for count in result["reduced"].values())  # the discriminator: three forwards, one reduction
    _assert_same(result["end"], r1["vaegan"]["end"])
    assert all(_changed(result, f"networks.{n}.") for n in ("enc", "dec", "dis"))


def test_gradient_penalty_frozen_rows_and_a_flow_prior_under_ddp(ranks):
    (r0, r1), _ = ranks
    result = r0["wgan_gp_flow"]
    assert result["wrappers"] == {"dis": "DistributedDataParallel", "gen": "DistributedDataParallel"}  # feat: frozen
    assert result["callers"] == [["dis"], ["gen"]]  # each phase calls the other network raw
    _assert_same(result["end"], r1["wgan_gp_flow"]["end"])  # the flow's flat average too
    assert _changed(result, "priors.z.") and _changed(result, "networks.gen.") and _changed(result, "networks.dis.rows.3")
    for frozen in ("networks.dis.rows.1", "networks.dis.rows.2", "networks.feat."):
        assert not _changed(result, frozen), frozen


def test_states_follow_their_mean_beside_the_wrappers(ranks):
    (r0, r1), _ = ranks
    result = r0["began"]
    assert set(result["wrappers"]) == {"enc", "dec", "gen"} and result["callers"] == [["dec", "enc", "gen"]]
    _assert_same(result["end"], r1["began"]["end"])
    assert _changed(result, "states.k")


def test_an_objective_without_gradient_leaves_its_wrapper_waiting_for_nothing(ranks):
    (r0, r1), _ = ranks
    result = r0["no_grad_loss"]
    assert result["callers"] == [["classifier", "probe"]]  # the probe is called through its wrapper, then no backward
    assert result["reduced"] == {"classifier": 4, "probe": 0}
    _assert_same(result["end"], r1["no_grad_loss"]["end"])
    assert _changed(result, "networks.classifier.") and not _changed(result, "networks.probe.")


def test_parameters_the_objective_does_not_reach_stop_the_run_with_their_rows(ranks):
    (r0, r1), cases = ranks
    for r in (r0, r1):  # every rank stops at the same step, so none waits for the other
        message = r["unreached"]["error"]
        assert "objective 'enc' does not reach 2 of the 4 trainable parameter tensors of network 'enc' (layers[2])" in message
        assert message.startswith(f"{cases['unreached'][0]}:5:") and "networks.enc.layers[2]" in message


# ---------------------------------------------------------------- whole runs, one process against two

def _test_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["test"]


def test_two_phase_gan_trains_in_two_processes_like_one(tmp_path):
    import yaml

    doc = tiny_gan_doc("ddp_gan", 0.002, [{"update": ["dis"]}, {"update": ["gen"]}], epochs=2)
    doc["evaluate"] = {"losses": ["d_real", "d_fake", "g_adv"], "grids": {}}
    spec = tmp_path / "gan.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "one", "--no-progress")
    assert rc == 0, err
    double = run_cli(["run", str(spec), "--out", str(tmp_path / "two"), "--no-progress", "--nproc", "2"], timeout=240)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("ddp_gan: done") == 1
    one, two = _test_metrics(tmp_path / "one"), _test_metrics(tmp_path / "two")
    for name in ("d_real", "d_fake", "g_adv"):  # 2 x 10 steps of batch 16 (8 + 8), each rank its own noise
        assert two[name] == pytest.approx(one[name], rel=0.05), name


def test_vaegan_under_an_outer_torchrun_with_two_rendezvous_nodes(tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... -m genspec run SPEC`, the
    README's multi-node command, with both nodes on this machine: genspec joins the outer world
    (no --nproc) and trains three objectives from one forward pass as one process does."""
    import socket
    import subprocess
    import sys

    spec = tmp_path / "vaegan.yaml"
    spec.write_text(TINY_VAEGAN)
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "one", "--no-progress")
    assert rc == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "genspec-test", "-m", "genspec", "run", str(spec),
                               "--out", str(tmp_path / "two"), "--no-progress"],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(2)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), [err for _, err in outputs]
    assert sum(out.count("tiny_vaegan: done") for out, _ in outputs) == 1  # global rank 0 reports, on one node
    one, two = _test_metrics(tmp_path / "one"), _test_metrics(tmp_path / "two")
    assert [json.loads(line)["epoch"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert two["gan"] == pytest.approx(one["gan"], rel=0.03)
    assert two["llike"] == pytest.approx(one["llike"], rel=0.1)
    assert two["prior"] == pytest.approx(one["prior"], rel=0.15)


@pytest.mark.slow
def test_compiled_networks_train_under_ddp_like_one_uncompiled_process(tmp_path):
    """train.compile replaces each raw network's forward_taps; the DDP wrappers call the compiled
    one. The classifier's step draws nothing, so two ranks match one process closely."""
    spec = tmp_path / "classifier.yaml"
    spec.write_text(TINY_DIGITS_CLASSIFIER)
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "one", "--no-progress")
    assert rc == 0, err
    double = run_cli(["run", str(spec), "--out", str(tmp_path / "two"), "--no-progress", "--nproc", "2",
                      "--set", "train.compile=true"], timeout=600)
    assert double.returncode == 0, double.stderr
    assert _test_metrics(tmp_path / "two")["nll"] == pytest.approx(_test_metrics(tmp_path / "one")["nll"], rel=1e-3)


def test_every_rank_names_itself_when_it_stops(monkeypatch):
    from genspec.cli import _speaker

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _speaker() == "genspec"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _speaker() == "genspec (rank 1)"  # the cause may be this rank's own (its data missing on its node)


def printed_by(script: str) -> list[str]:
    """The lines a Python script run in a fresh interpreter prints (it must exit 0)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=cli_env(),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_process_group_is_destroyed_before_the_interpreter_tears_down():
    """Left to the interpreter's teardown, gloo's threads sometimes abort a process that trained
    well (SIGABRT, "terminate called without an active exception"; CI saw it once in rank 1 of a
    resumed run). Joining the group registers its destruction at exit, while Python is whole: a
    handler registered before the group (so run after genspec's) finds it gone."""
    script = (
        "import atexit, os, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29531', RANK='0', WORLD_SIZE='1')\n"
        "from genspec.compiler.distributed import World, setup\n"
        "setup(World(), 'cpu')\n"
        "print('initialized:', dist.is_initialized(), flush=True)\n"
    )
    assert printed_by(script) == ["initialized: True", "initialized at exit: False"]


def test_shutdown_frees_the_wrappers_that_hold_the_group_before_destroying_it():
    """The DDP wrappers of a finished run sit in reference cycles (the model, its wrappers and
    their reducers), so they outlive the run until the collector runs, and their reducers keep the
    gloo group alive: left to the interpreter's teardown, the group's threads were still joined
    there and aborted rank 1 of a 2-process run once more (SIGABRT after a run that went well).
    Shutdown collects them first. With automatic collection off, nothing else would."""
    script = (
        "import gc, os, torch, torch.distributed as dist\n"
        "gc.disable()\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29532', RANK='0', WORLD_SIZE='1')\n"
        "from torch.nn.parallel import DistributedDataParallel as DDP\n"
        "from genspec.compiler.distributed import World, setup, shutdown\n"
        "setup(World(), 'cpu')\n"
        "holder = {'ddp': DDP(torch.nn.Linear(2, 2))}\n"
        "holder['self'] = holder  # a cycle, as the model and its wrappers make one\n"
        "del holder\n"
        "alive = lambda: sum(isinstance(o, DDP) for o in gc.get_objects())\n"
        "print('before:', alive(), flush=True)\n"
        "shutdown()\n"
        "print('after:', alive(), dist.is_initialized(), flush=True)\n"
    )
    assert printed_by(script) == ["before: 1", "after: 0 False"]
