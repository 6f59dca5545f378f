"""`genspec diff A B`: a semantic diff of two resolved specs.

Formatting, comments, key order, compact-vs-mapping rows and number spelling do not count;
params (and what derives from them), layer tables and extra sections do. Checked both through
the command line (a subprocess, as a user runs it) and through `genspec.report.diff.diff_specs`.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import genspec
from genspec.report.diff import diff_specs, is_equivalent, render_text
from spec_helpers import genspec_subprocess

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "specs" / "quickstart.yaml"
BETA_VAE = REPO / "specs" / "beta_vae_digits.yaml"
QUICKSTART_TEXT = QUICKSTART.read_text()


def genspec_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return genspec_subprocess(*args, timeout=timeout)


def quickstart_with(*replacements: tuple[str, str]) -> str:
    text = QUICKSTART_TEXT
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the quick-start"
        text = text.replace(old, new)
    return text


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# The quick-start, rewritten: other key order (top level and inside sections), other comments and
# spacing, flow mappings, rows as canonical mappings, `1e-3` as `0.001`, expressions re-spaced.
QUICKSTART_REWRITTEN = """\
# an equivalent rewrite of the quick-start: nothing here changes the model
name: quickstart
genspec: 1

objectives:
  vae:
    optimizer: adam(lr)
    minimize: elbo
    networks: [enc, dec]

losses:
  rec:  sqerr(x_rec,x)/(2*sigma2)
  kl:   kl(q,z)
  elbo: rec+beta*kl

graph:
  q:     enc(x)
  z:     rsample(q)
  x_rec: dec(z)
  x_gen: dec(sample(z))

networks:
  dec:
    layers:
      - {op: fc, out: 64, act: relu}
      - fc 128,   relu
      - {act: sigmoid, out: 64, op: fc}
      - {op: reshape, shape: [1, 8, 8]}
    input: z
  enc:
    layers: [flatten, {op: fc, out: 128, act: relu}, "fc 64, relu", {op: gaussian, out: 8}]
    input: x

latent: {z: {prior: normal, shape: [8]}}

data: {split: {test: 297, train: 1500}, range: [0, 1], dataset: digits}

params: {lr: 0.001, sigma2: 0.05, beta: 1}

evaluate:
  grids: [samples, reconstructions, interpolations]
  losses: [rec, kl, elbo]

train: {seed: 0, batch_size: 64, epochs: 100}

source:
  paper: "a different citation: metadata never counts"
"""


@pytest.fixture()
def pair(tmp_path):
    a = write(tmp_path, "a.yaml", quickstart_with(("lr: 1.0e-3", "lr: 1e-3")))
    b = write(tmp_path, "b.yaml", QUICKSTART_REWRITTEN)
    return a, b


# ---------------------------------------------------------------- (a) equivalent

def test_rewritten_spec_is_equivalent_cli(pair):
    a, b = pair
    result = genspec_cli("diff", a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("equivalent: no differences after resolution\n")
    assert result.stderr == ""


def test_rewritten_spec_is_equivalent_api(pair):
    a, b = pair
    result = diff_specs(genspec.load(a), genspec.load(b))
    assert result["changes"] == [] and result["networks"] == {}
    assert is_equivalent(result)
    # and against the shipped file itself (which spells the rate 1.0e-3)
    assert is_equivalent(diff_specs(genspec.load(QUICKSTART), genspec.load(b)))


def test_the_rewrite_really_differs_in_form(pair):
    """Guard: the rewrite must differ textually and in key order, or (a) proves nothing."""
    import yaml

    a, b = pair
    raw_a, raw_b = yaml.safe_load(a.read_text()), yaml.safe_load(b.read_text())
    assert list(raw_a) != list(raw_b)
    assert raw_a["params"]["lr"] == "1e-3"  # PyYAML reads it as text; genspec must read a float
    assert raw_b["params"]["lr"] == 0.001
    assert isinstance(raw_b["networks"]["enc"]["layers"][1], dict)


def test_mapping_row_with_explicit_default_is_equivalent(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("      - fc 128, relu\n      - fc 64, relu\n",
                                                    "      - {op: fc, out: 128, act: relu, bias: true}\n"
                                                    "      - fc 64, relu\n")))
    spec_a, spec_b = genspec.load(a), genspec.load(b)
    # same model: same parameter count
    assert spec_a.networks["enc"].info.trainable == spec_b.networks["enc"].info.trainable
    assert is_equivalent(diff_specs(spec_a, spec_b))


def test_mapping_row_that_turns_off_a_default_is_a_changed_row(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("      - fc 128, relu\n      - fc 64, relu\n",
                                                    "      - {op: fc, out: 128, act: relu, bias: false}\n"
                                                    "      - fc 64, relu\n")))
    result = diff_specs(genspec.load(a), genspec.load(b))
    assert not is_equivalent(result)
    changed = [r for r in result["networks"]["enc"]["rows"] if r["op"] != "same"]
    assert [(r["op"], r["cells"]) for r in changed] == [("changed", {"bias": [True, False]})]


def test_freezing_a_row_is_a_changed_frozen_cell(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("      - fc 128, relu\n      - fc 64, sigmoid\n",
                                                    "      - fc 128, relu, frozen\n      - fc 64, sigmoid\n")))
    rows = diff_specs(genspec.load(a), genspec.load(b))["networks"]["dec"]["rows"]
    changed = [(r["a"], r["b"], r["cells"]) for r in rows if r["op"] != "same"]
    assert changed == [("fc 128, relu", "fc 128, relu, frozen", {"frozen": [False, True]})]


def test_freezing_a_network_shows_frozen_false_to_true(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("    input: z\n", "    input: z\n    freeze: true\n"),
                                                   ("{networks: [enc, dec], minimize: elbo", "{networks: [enc], minimize: elbo")))
    entry = diff_specs(genspec.load(a), genspec.load(b))["networks"]["dec"]
    assert (entry["trainable"], entry["frozen"]) == (-17152, 17152)
    assert [r["cells"] for r in entry["rows"]] == [{"frozen": [False, True]}] * 4


# ---------------------------------------------------------------- (b) a changed param

def test_changed_param_lists_only_that_param(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("beta: 1.0 ", "beta: 2.5 ")))
    result = genspec_cli("diff", a, b)
    assert result.returncode == 1, result.stdout + result.stderr
    changed = [line.strip() for line in result.stdout.splitlines() if ": " in line and "->" in line and "(" not in line]
    assert changed == ["params.beta: 1.0 -> 2.5"]
    api = diff_specs(genspec.load(a), genspec.load(b))
    assert api["changes"] == [{"path": ["params", "beta"], "kind": "changed", "a": 1.0, "b": 2.5}]
    assert api["networks"] == {}


def test_changed_learning_rate_shows_the_optimizer_that_names_it(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("lr: 1.0e-3", "lr: 2e-4")))
    api = diff_specs(genspec.load(a), genspec.load(b))
    assert {tuple(c["path"]): (c["a"], c["b"]) for c in api["changes"]} == {
        ("params", "lr"): (0.001, 0.0002),
        ("objectives", "vae", "optimizer"): ("adam(lr=0.001)", "adam(lr=0.0002)"),
    }
    assert api["networks"] == {}
    result = genspec_cli("diff", a, b)
    assert result.returncode == 1
    assert "params.lr: 0.001 -> 0.0002" in result.stdout
    assert "objectives.vae.optimizer: adam(lr=0.001) -> adam(lr=0.0002)" in result.stdout
    assert "network" not in result.stdout.replace("networks", "")


# ---------------------------------------------------------------- (c) layer tables

def _show_totals(path: Path) -> dict:
    result = genspec_cli("show", path, "--json")
    assert result.returncode == 0, result.stderr
    return {name: net["trainable"] for name, net in json.loads(result.stdout)["networks"].items()}


def test_layer_table_change_aligns_rows(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    # enc: the second hidden layer widened from 64 to 128, and a new 32-unit layer before the Gaussian head
    b = write(tmp_path, "b.yaml", quickstart_with(
        ("      - fc 64, relu\n      - gaussian 8",
         "      - fc 128, relu\n      - fc 32, relu\n      - gaussian 8")))
    result = genspec_cli("diff", a, b)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not any(line.strip().startswith(("params", "data", "graph", "losses")) for line in lines)
    changed = [line for line in lines if line.startswith("  ~ ")]
    added = [line for line in lines if line.startswith("  + ")]
    removed = [line for line in lines if line.startswith("  - ")]
    assert len(changed) == 1 and len(added) == 1 and not removed, result.stdout
    assert re.match(r"  ~ fc 64, relu\s+\| fc 128, relu\s+\[out: 64 -> 128\]$", changed[0]), changed[0]
    assert re.match(r"  \+ \s*\| fc 32, relu$", added[0]), added[0]
    assert sum(line.startswith("    ") and "|" in line for line in lines) == 3  # flatten, fc 128, gaussian unchanged
    assert "network dec" not in result.stdout

    # the parameter-count difference is the difference of `genspec show --json` totals
    before, after = _show_totals(a), _show_totals(b)
    delta = after["enc"] - before["enc"]
    assert delta != 0 and after["dec"] == before["dec"]
    assert f"network enc: changed (trainable {delta:+,})" in result.stdout
    api = diff_specs(genspec.load(a), genspec.load(b))
    assert list(api["networks"]) == ["enc"]
    enc = api["networks"]["enc"]
    assert enc["trainable"] == delta
    assert sum(net["trainable"] for net in api["networks"].values()) == sum(after.values()) - sum(before.values())
    assert [r["op"] for r in enc["rows"]] == ["same", "same", "changed", "added", "same"]
    assert enc["rows"][2]["cells"] == {"out": [64, 128]}
    # by hand: 64->128 on a 128-wide input, then 128->32, then the head reads 32 instead of 64 (2*8 outputs)
    assert delta == (128 * 128 + 128) - (128 * 64 + 64) + (128 * 32 + 32) + (32 - 64) * 16


def test_removed_row_is_marked_minus(tmp_path):
    a = write(tmp_path, "a.yaml", QUICKSTART_TEXT)
    b = write(tmp_path, "b.yaml", quickstart_with(("      - fc 64, relu\n      - gaussian 8", "      - gaussian 8")))
    api = diff_specs(genspec.load(a), genspec.load(b))
    rows = api["networks"]["enc"]["rows"]
    assert [r["op"] for r in rows] == ["same", "same", "removed", "same"]
    assert rows[2]["a"] == "fc 64, relu"
    assert "  - fc 64, relu" in render_text(api)


# ---------------------------------------------------------------- (d) extends

@pytest.mark.parametrize("order", ["base_first", "child_first"])
def test_extends_child_shows_only_its_overrides(order):
    a, b = (QUICKSTART, BETA_VAE) if order == "base_first" else (BETA_VAE, QUICKSTART)
    result = genspec_cli("diff", a, b)
    assert result.returncode == 1, result.stdout + result.stderr
    api = diff_specs(genspec.load(a), genspec.load(b))
    paths = [tuple(c["path"]) for c in api["changes"]]
    assert sorted(paths) == [("params", "beta"), ("train", "epochs"), ("tune",)]
    assert api["networks"] == {}
    by_path = {tuple(c["path"]): c for c in api["changes"]}
    child_side = "b" if order == "base_first" else "a"
    assert by_path[("params", "beta")][child_side] == 4.0
    assert by_path[("train", "epochs")][child_side] == 20
    assert by_path[("tune",)]["kind"] == ("added" if order == "base_first" else "removed")
    assert by_path[("tune",)][child_side]["beta"] == {"range": [0.1, 10], "log": True}
    body = result.stdout.splitlines()[1:]  # the header names both files
    assert not any("network" in line for line in body)
    assert not any(line.strip().startswith(("name", "source", "extends", "genspec")) for line in body)


# ---------------------------------------------------------------- (e) invalid

def test_invalid_spec_exits_2_with_located_error(tmp_path):
    bad = write(tmp_path, "bad.yaml", quickstart_with(("      - fc 64, relu\n      - gaussian 8",
                                                        "      - fc 64 relu\n      - gaussian 8")))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "fc 64 relu" in text)
    result = genspec_cli("diff", QUICKSTART, bad)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert re.search(rf"{re.escape(str(bad))}:{line}:\d+: networks\.enc\.layers\[2\]: unexpected 'relu'", result.stderr), \
        result.stderr
    # the other side invalid too: both are reported
    bad2 = write(tmp_path, "bad2.yaml", quickstart_with(("epochs: 100", "epochs: -3")))
    result = genspec_cli("diff", bad2, bad)
    assert result.returncode == 2
    assert str(bad2) + ":" in result.stderr and str(bad) + ":" in result.stderr


def test_missing_file_exits_2(tmp_path):
    result = genspec_cli("diff", QUICKSTART, tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- (f) formats

def test_json_format_parses(tmp_path):
    b = write(tmp_path, "b.yaml", quickstart_with(("beta: 1.0 ", "beta: 2.5 "), ("      - fc 64, relu\n      - gaussian 8",
                                                                                   "      - fc 96, relu\n      - gaussian 8")))
    result = genspec_cli("diff", QUICKSTART, b, "--format", "json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["a"]["name"] == data["b"]["name"] == "quickstart"
    assert data["changes"] == [{"path": ["params", "beta"], "kind": "changed", "a": 1.0, "b": 2.5}]
    assert data["networks"]["enc"]["rows"][2]["cells"] == {"out": [64, 96]}
    assert data["networks"]["enc"]["trainable"] == (96 - 64) * (128 + 1) + (96 - 64) * 16


def test_json_format_equivalent(pair):
    a, b = pair
    result = genspec_cli("diff", a, b, "--format", "json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["changes"] == [] and data["networks"] == {}


def test_markdown_format_has_a_table(tmp_path):
    result = genspec_cli("diff", QUICKSTART, BETA_VAE, "--format", "md")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("## ")
    assert "| key | quickstart | beta_vae_digits |" in lines
    assert "|---|---|---|" in lines
    assert "| `params.beta` | 1.0 | 4.0 |" in lines
    assert "| `train.epochs` | 100 | 20 |" in lines
    b = write(tmp_path, "b.yaml", quickstart_with(("      - fc 64, relu\n      - gaussian 8",
                                                    "      - fc 96, relu\n      - gaussian 8")))
    result = genspec_cli("diff", QUICKSTART, b, "--format", "md")
    assert "### network enc: changed" in result.stdout
    assert result.stdout.count("```") == 2
