"""Fuzzing (issue 23): mutated shipped specs either load or fail with genspec's own SpecError, and
a run interrupted at any step, then resumed (or started again where no checkpoint was written),
ends exactly where the uninterrupted run ends. Sized to cost well under a minute."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genspec.errors import SpecError
from genspec.graph.pipeline import load_runs
from genspec.lang.resolve import is_fragment
from spec_helpers import REPO, cli_in_process, tiny_digits_vae

SHIPPED = sorted(p for p in (REPO / "specs").rglob("*.yaml") if not is_fragment(p, REPO / "specs"))  # no spec alone
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=30), st.sampled_from(["fc 8", "conv 4 3x3", "relu", "mean(x)", "bce(d, 1)", "gen(z)",
                                                          "adam(1e-3)", "../../../etc/passwd", "{", "x4", "1e400"]),
                   st.lists(st.integers(0, 5), max_size=3))


def paths(data, prefix=()):
    """Every key path in a spec's data (mappings and lists)."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += paths(value, prefix + (i,))
    return out


def mutate(data, path, action, leaf, key):
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = leaf
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[key] = leaf
    elif action == "wrap":
        parent[last] = {"nested": parent[last]}
    elif action == "extends" and isinstance(data, dict):
        data["extends"] = leaf if isinstance(leaf, str) else str(leaf)


@pytest.fixture(scope="module")
def specs_copy(tmp_path_factory):
    """The shipped specs in a folder of their own, so mutants sit beside the bases they extend."""
    import shutil

    root = tmp_path_factory.mktemp("fuzz_specs") / "specs"
    shutil.copytree(REPO / "specs", root)
    return root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shipped=st.sampled_from(SHIPPED), pick=st.integers(0, 10 ** 6),
       actions=st.lists(st.sampled_from(["replace", "delete", "add", "wrap", "extends"]), min_size=1, max_size=3),
       leaf=LEAVES, key=st.sampled_from(["epochs", "layers", "extends", "graph", "zzz", "batch_size", "input"]))
def test_mutated_shipped_specs_load_or_fail_cleanly(specs_copy, shipped, pick, actions, leaf, key):
    spec = specs_copy / shipped.relative_to(REPO / "specs")
    data = yaml.safe_load(spec.read_text())
    for action in actions:
        candidates = paths(data)
        if not candidates:
            break
        mutate(data, candidates[pick % len(candidates)], action, copy.deepcopy(leaf), key)
    target = spec.parent / "mutant.yaml"  # beside the spec, so its relative `extends` still resolves
    try:
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            load_runs(target)
        except SpecError:
            pass  # genspec's own located error: the only acceptable failure
    finally:
        target.unlink(missing_ok=True)


# ---------------------------------------------------------------- resume after any interruption

SPEC = tiny_digits_vae("fuzz_resume").replace("train: {epochs: 1, batch_size: 32, seed: 0, device: cpu}",
                                              "train: {epochs: 3, batch_size: 16, seed: 0, device: cpu}\n"
                                              "evaluate: {grids: {}}")
STEPS = 3 * 4  # 64 training examples in batches of 16, three epochs


def final_state(folder: Path) -> tuple:
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return state["model"]["networks"], [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "spec.yaml").write_text(SPEC)
    rc, _, err = cli_in_process("run", folder / "spec.yaml", "--out", folder / "run", "--no-progress")
    assert rc == 0, err
    return folder / "spec.yaml", final_state(folder / "run")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stop=st.integers(1, STEPS))
def test_resume_after_an_interruption_at_any_step_equals_the_uninterrupted_run(tmp_path_factory, uninterrupted, stop):
    from genspec.compiler.model import Model

    spec, (weights, history) = uninterrupted
    out = tmp_path_factory.mktemp("stopped") / "run"
    real, calls = Model.train_step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    Model.train_step = interrupted
    try:
        rc, _, err = cli_in_process("run", spec, "--out", out, "--no-progress")
    finally:
        Model.train_step = real
    assert rc == 130, err
    again = ["--resume"] if (out / "checkpoint.pt").exists() else []
    rc, _, err = cli_in_process("run", spec, "--out", out, "--no-progress", *again)
    assert rc == 0, err
    got_weights, got_history = final_state(out)
    assert got_history == history
    assert weights.keys() == got_weights.keys() and all(torch.equal(weights[k], got_weights[k]) for k in weights)
