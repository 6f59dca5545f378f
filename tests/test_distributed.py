"""`genspec run --nproc N`: data-parallel training in N processes (gloo on this CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from genspec.cli import _without_nproc
from genspec.distributed import SINGLE, World, shard
from spec_helpers import REPO, cli_in_process, run_cli

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


def test_bad_nproc_is_refused_before_anything_runs(tmp_path):
    rc, _, err = cli_in_process("run", QUICKSTART, "--out", tmp_path / "run", "--nproc", "0")
    assert rc == 1 and "--nproc must be a positive number of processes, got 0" in err
    assert not (tmp_path / "run").exists()


def test_each_rank_takes_its_slice_of_the_global_batch():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    assert shard(x, y, SINGLE)[0] is x
    parts = [shard(x, y, World(rank, 3, rank)) for rank in range(3)]
    assert sorted(int(v) for part, _ in parts for v in part.flatten()) == list(range(10))
    assert torch.equal(parts[1][1], torch.tensor([1, 4, 7]))


def test_launched_processes_get_the_command_without_nproc():
    assert _without_nproc(["run", "a.yaml", "--nproc", "2", "--set", "x=1"]) == ["run", "a.yaml", "--set", "x=1"]
    assert _without_nproc(["run", "a.yaml", "--nproc=4"]) == ["run", "a.yaml"]
