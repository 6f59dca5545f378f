"""Stacked replicas (genspec/stack.py): the seeds of one configuration trained as one model with a
leading model dimension give the results of separate runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import genspec
from genspec.stack import cannot_stack, train_stacked
from genspec.train import run
from spec_helpers import REPO, TINY_DIGITS_CLASSIFIER

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


def test_specs_that_cannot_stack_say_why():
    assert cannot_stack(genspec.load(REPO / "specs" / "wgan_gp.yaml")) == "the gradient penalty differentiates inside the step"
    assert cannot_stack(genspec.load(REPO / "specs" / "began.yaml")) == "states, traces and balancing run outside the step"
    assert cannot_stack(genspec.load(REPO / "specs" / "larsen_vaegan.yaml")) == "batch statistics"
    assert cannot_stack(genspec.load(REPO / "specs" / "encoderless" / "mnist_base.yaml")) is None
