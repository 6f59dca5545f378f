"""Sweeps: the factorial expansion of specs/encoderless/mnist_study.yaml (names, levels, `per`,
list patches), `--only`, study-level and per-run `--set`, and located errors in a level; plus
`genspec validate` / `show` on a sweep.

Torch-free: expansion, validation and `show` never build a network.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from genspec.errors import SpecError
from genspec.graph.pipeline import load_runs, split_overrides
from genspec.experiments.study import plan_study
from spec_helpers import cli_in_process as run_cli, tiny_digits_vae

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "specs" / "encoderless" / "mnist_study.yaml"
STUDY_TEXT = STUDY.read_text()
LAYERS, PRIORS, ENCODERS = ["fc", "conv"], ["normal", "flow2", "flow6"], ["L", "PNL", "NL", "RKS"]




def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing `needle`."""
    lines = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} is on lines {lines}"
    return lines[0]


def problems(path, overrides=None, only=None) -> list:
    with pytest.raises(SpecError) as info:
        load_runs(path, overrides, only)
    return info.value.problems


@pytest.fixture(scope="module")
def runs():
    return {run.id: (run, spec) for run, spec in load_runs(STUDY)}


# ---------------------------------------------------------------- the thesis's study

def test_study_expands_to_24_distinct_named_runs(runs):
    expected = [f"layers={l},prior={p},encoder={e}" for l in LAYERS for p in PRIORS for e in ENCODERS]
    assert list(runs) == expected  # factor order, levels in declared order, all distinct
    for run_id, (run, spec) in runs.items():
        assert run.id == ",".join(f"{f}={l}" for f, l in run.levels.items())
        assert spec.name == "encoderless_mnist"
        assert "sweep" not in spec.raw and "repeats" not in spec.raw and "study" not in spec.raw


def test_levels_are_applied(runs):
    def spec(layers, prior, encoder):
        return runs[f"layers={layers},prior={prior},encoder={encoder}"][1]

    base_fc = spec("fc", "normal", "L")
    assert base_fc.latents["z"].shape == (16,) and base_fc.latents["z"].prior == "normal"
    assert [r["op"] for r in base_fc.networks["enc"].rows] == ["flatten", "fc", "fc", "fc", "gaussian"]
    assert base_fc.networks["enc"].info.frozen == 0 and base_fc.objectives["vae"].networks == ["enc", "dec"]
    # NL, fc: the last row patched to a fixed variance, every row frozen, the other rows as in the base
    nl = spec("fc", "normal", "NL").networks["enc"]
    assert nl.rows[-1] == {"op": "gaussian", "out": 16, "var": 1e-6}
    assert nl.rows[:-1] == base_fc.networks["enc"].rows[:-1]
    assert all(r.frozen for r in nl.info.rows) and nl.info.trainable == 0
    # NL, conv: the conv head patched, on top of the conv level's table
    nl_conv = spec("conv", "normal", "NL").networks["enc"]
    assert nl_conv.rows[-1] == {"op": "gaussian", "out": 4, "kernel": 3, "stride": 1, "padding": "valid", "var": 1e-6}
    assert [r["op"] for r in nl_conv.rows] == ["conv", "maxpool"] * 3 + ["gaussian"]
    # RKS, conv: a single 16x16 /16 conv head
    rks = spec("conv", "normal", "RKS").networks["enc"]
    assert rks.rows == [{"op": "gaussian", "out": 4, "kernel": 16, "stride": 16, "padding": "valid", "var": 1e-6}]
    assert rks.info.output == (4, 2, 2) and rks.info.trainable == 0 and rks.info.frozen == 1028
    rks_fc = spec("fc", "flow6", "RKS").networks["enc"]
    assert [r["op"] for r in rks_fc.rows] == ["flatten", "gaussian"]
    # PNL: everything but the head frozen
    pnl = spec("fc", "normal", "PNL").networks["enc"]
    assert [r.frozen for r in pnl.info.rows if r.params] == [True, True, True, False]
    # flow6: a 6-flow RealNVP prior, trained by the same objective
    flow6 = spec("conv", "flow6", "L")
    assert flow6.latents["z"].prior == "realnvp" and flow6.latents["z"].prior_kwargs == {"flows": 6, "hidden": 64}
    assert flow6.objectives["vae"].networks == ["enc", "dec", "z"]
    assert spec("fc", "flow2", "PNL").latents["z"].prior_kwargs["flows"] == 2
    # conv: the latent is 4x2x2, the decoder ends in one channel at 32x32
    conv = spec("conv", "normal", "L")
    assert conv.latents["z"].shape == (4, 2, 2) and conv.networks["dec"].input == (4, 2, 2)
    assert conv.networks["dec"].info.output == (1, 32, 32) and conv.networks["enc"].info.output == (4, 2, 2)


def test_only_filters_levels():
    nl = load_runs(STUDY, only=["encoder=NL"])
    assert len(nl) == 6 and all(run.levels["encoder"] == "NL" for run, _ in nl)
    two = load_runs(STUDY, only=["encoder=NL", "encoder=RKS", "layers=conv"])
    assert [run.id for run, _ in two] == [f"layers=conv,prior={p},encoder={e}" for p in PRIORS for e in ("NL", "RKS")]
    one = load_runs(STUDY, only=["encoder=L", "layers=fc", "prior=flow2"])
    assert [run.id for run, _ in one] == ["layers=fc,prior=flow2,encoder=L"]


def test_only_an_unknown_level_is_a_located_error():
    found = problems(STUDY, only=["encoder=XX"])
    assert len(found) == 1
    problem = found[0]
    assert problem.location.file == str(STUDY) and problem.location.line == line_of(STUDY_TEXT, "sweep:")
    assert "--only encoder=XX" in problem.message
    assert "encoder=L|PNL|NL|RKS" in problem.message and "layers=fc|conv" in problem.message
    rc, out, err = run_cli("validate", STUDY, "--only", "encoder=XX")
    assert rc == 2 and out == ""
    assert err.startswith(f"{STUDY}:{line_of(STUDY_TEXT, 'sweep:')}:1: sweep: --only encoder=XX") and "Traceback" not in err
    assert problems(STUDY, only=["encodr=L"])[0].message.startswith("--only encodr=L: no such factor level")


def test_study_level_and_per_run_overrides():
    study, per_run = split_overrides(["repeats=2", "train.epochs=3", "sweep.encoder.L={}", "study.columns=[prior]",
                                      "data.split.train=10", "networks.enc.freeze=false"])
    assert study == ["repeats=2", "sweep.encoder.L={}", "study.columns=[prior]"]
    assert per_run == ["train.epochs=3", "data.split.train=10", "networks.enc.freeze=false"]
    # every other --set changes every run, after the levels
    runs = load_runs(STUDY, ["train.epochs=3", "networks.enc.freeze=false"])
    assert len(runs) == 24
    for run, spec in runs:
        assert spec.train["epochs"] == 3
        enc = spec.networks["enc"]
        assert enc.info.frozen == 0 and enc.info.trainable > 0, run.id
    nl = dict((r.id, s) for r, s in runs)["layers=fc,prior=normal,encoder=NL"]
    assert nl.networks["enc"].rows[-1]["var"] == 1e-6  # the level's own patch is kept
    # --set sweep... changes a level (the study), not the runs
    changed = load_runs(STUDY, ["sweep.encoder.NL.networks.enc.freeze=all_but_last"], ["encoder=NL", "layers=fc"])
    for run, spec in changed:
        assert spec.networks["enc"].info.trainable == 16 * 64 + 16  # the fixed-variance head trains
    # --set repeats=2 changes the study: two seeds per configuration
    section, planned = plan_study(str(STUDY), ["repeats=2", "train.epochs=3"], ["encoder=NL", "layers=fc"], Path("out"))
    assert section["repeats"] == 2 and section["factors"] == ["layers", "prior", "encoder"]
    assert [(p.run.id, p.seed) for p in planned] == [(f"layers=fc,prior={p},encoder=NL", s) for p in PRIORS for s in (0, 1)]
    for item in planned:
        assert item.spec.train["seed"] == item.seed and item.spec.train["epochs"] == 3
        assert item.folder == Path("out") / item.run.id / f"seed{item.seed}"
    _, default = plan_study(str(STUDY), [], ["encoder=NL", "layers=fc"], Path("out"))
    assert len(default) == 3 * 5  # repeats: 5 in the file


def test_validate_and_show_on_the_study():
    rc, out, err = run_cli("validate", STUDY)
    assert rc == 0, err
    assert out == f"{STUDY}: ok (encoderless_mnist: 24 configurations x 5 seeds = 120 runs, each valid)\n"
    rc, out, err = run_cli("validate", STUDY, "--only", "encoder=NL")
    assert rc == 0 and "6 configurations x 5 seeds = 30 runs" in out
    rc, out, err = run_cli("show", STUDY, "--only", "encoder=RKS", "--only", "layers=conv")
    assert rc == 0, err
    headers = re.findall(r"^=== (.+)$", out, re.M)
    assert headers == [f"layers=conv,prior={p},encoder=RKS" for p in PRIORS]
    blocks = out.split("=== ")[1:]
    for block in blocks:
        assert "enc  (input 1x32x32, init xavier_uniform)" in block and "dec  (input 4x2x2" in block
        assert re.search(r"^0\s+gaussian 4 16x16 /16 valid var=1e-0?6\s+4x2x2\s+0\s+1,028$", block, re.M), block
        assert "optimisers" in block
    rc, out, err = run_cli("show", STUDY, "--json", "--only", "encoder=PNL", "--only", "prior=flow6")
    assert rc == 0, err
    shown = json.loads(out)["runs"]
    assert list(shown) == ["layers=fc,prior=flow6,encoder=PNL", "layers=conv,prior=flow6,encoder=PNL"]
    assert shown["layers=fc,prior=flow6,encoder=PNL"]["latent"]["z"] == {"shape": [16], "prior": "realnvp", "trainable": 63072}
    assert shown["layers=conv,prior=flow6,encoder=PNL"]["networks"]["enc"]["trainable"] == 8 * 16 * 9 + 8


def flow_params(dim: int, flows: int, hidden: int = 64) -> int:
    half = dim // 2
    return flows * 2 * ((half * hidden + hidden) + (hidden * hidden + hidden) + (hidden * half + half))


def test_show_optimiser_table_counts_the_flow_it_trains():
    rc, out, err = run_cli("show", STUDY, "--only", "encoder=RKS", "--only", "layers=conv", "--only", "prior=flow2")
    assert rc == 0, err
    row = re.search(r"^vae\s+nelbo\s+enc, dec, z\s+adam\(lr=0\.001\)\s+([\d,]+)$", out, re.M)
    assert row, out
    dec = 26689  # the conv decoder; the RKS encoder is frozen
    assert int(row.group(1).replace(",", "")) == dec + flow_params(16, 2)


# ---------------------------------------------------------------- a small sweep of our own

TINY = tiny_digits_vae("tiny_sweep", textwrap.dedent("""\
    sweep:
      encoder:
        L: {}
        NL: {networks: {enc: {freeze: true, layers: {-1: "gaussian 2 var=1e-6"}}}}
      prior:
        normal: {}
        flow2: {latent: {z: {prior: "realnvp(flows=2, hidden=8)"}}, objectives: {vae: {networks: [enc, dec, z]}}}
    repeats: 2
    study:
      columns: [encoder]
      rows: [prior]
    """))
NL_LEVEL = '    NL: {networks: {enc: {freeze: true, layers: {-1: "gaussian 2 var=1e-6"}}}}'


def tiny(tmp_path, nl_level: str | None = None, replace: tuple[str, str] | None = None) -> tuple[Path, str]:
    text = TINY
    if nl_level is not None:
        assert text.count(NL_LEVEL) == 1
        text = text.replace(NL_LEVEL, "    NL: " + nl_level)
    if replace:
        assert text.count(replace[0]) == 1
        text = text.replace(*replace)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path, text


def test_tiny_sweep_list_patch_and_per(tmp_path):
    path, _ = tiny(tmp_path)
    runs = {run.id: spec for run, spec in load_runs(path)}
    assert list(runs) == ["encoder=L,prior=normal", "encoder=L,prior=flow2", "encoder=NL,prior=normal", "encoder=NL,prior=flow2"]
    nl = runs["encoder=NL,prior=normal"].networks["enc"]
    assert nl.rows == [{"op": "flatten"}, {"op": "fc", "out": 16, "act": "relu"}, {"op": "gaussian", "out": 2, "var": 1e-6}]
    assert runs["encoder=L,prior=normal"].networks["enc"].rows[-1] == {"op": "gaussian", "out": 2}
    # `per`: a part of one level that depends on another factor's level, applied after the level's own
    path, _ = tiny(tmp_path, '{networks: {enc: {freeze: true}}, per: {prior: {flow2: {networks: {enc: {freeze: false}}, '
                             'train: {epochs: 3}}}}}')
    runs = {run.id: spec for run, spec in load_runs(path)}
    assert runs["encoder=NL,prior=normal"].networks["enc"].info.trainable == 0
    assert runs["encoder=NL,prior=flow2"].networks["enc"].info.frozen == 0
    assert [s.train["epochs"] for s in runs.values()] == [1, 1, 1, 3]


def test_a_bad_row_in_a_level_is_located_in_the_sweep_file_once(tmp_path):
    path, text = tiny(tmp_path, '{networks: {enc: {freeze: true, layers: [flatten, "gaussian 2 vr=1e-6"]}}}')
    found = problems(path)
    assert len(found) == 1, [str(p) for p in found]  # the level is in two runs, reported once
    problem = found[0]
    assert problem.location.file == str(path) and problem.location.line == line_of(text, "vr=1e-6")
    assert problem.path == ("networks", "enc", "layers", 1)
    assert "unexpected 'vr=1e-6'" in problem.message and problem.message.endswith("[in run encoder=NL,prior=normal]")
    rc, out, err = run_cli("validate", path)
    first = err.splitlines()[0]  # the problem's line; the source line and a caret follow it
    assert rc == 2 and err.count("unexpected 'vr=1e-6'") == 1 and first.startswith(f"{path}:{line_of(text, 'vr=1e-6')}:")


def test_an_unknown_key_in_a_level_is_located_in_the_sweep_file_once(tmp_path):
    path, text = tiny(tmp_path, "{train: {epoch: 3}}")
    found = problems(path)
    assert len(found) == 1, [str(p) for p in found]
    problem = found[0]
    assert problem.location.file == str(path) and problem.location.line == line_of(text, "epoch: 3")
    assert problem.path == ("train", "epoch")
    assert "unknown key 'epoch'; did you mean 'epochs'?" in problem.message
    assert "[in run encoder=NL," in problem.message


def test_a_bad_patched_row_is_located_at_the_patch(tmp_path):
    path, text = tiny(tmp_path, '{networks: {enc: {freeze: true, layers: {-1: "gaussian 2 vr=1e-6"}}}}')
    found = problems(path)
    assert len(found) == 1
    assert found[0].path == ("networks", "enc", "layers", 2) and "unexpected 'vr=1e-6'" in found[0].message
    assert found[0].location.line == line_of(text, "vr=1e-6"), str(found[0])


def test_a_patch_out_of_range_is_located(tmp_path):
    path, text = tiny(tmp_path, '{networks: {enc: {layers: {7: "gaussian 2 var=1e-6"}}}}')
    found = problems(path)
    assert len(found) == 1
    assert found[0].location.file == str(path) and found[0].location.line == line_of(text, "{7: ")
    assert found[0].message == "no item 7 to patch: the list has 3"
    path, text = tiny(tmp_path, '{networks: {enc: {layers: {-4: "gaussian 2 var=1e-6"}}}}')
    assert problems(path)[0].message == "no item -4 to patch: the list has 3"


@pytest.mark.parametrize("per, message", [
    ("{layers: {fc: {}}}", "per: 'layers' is not another factor of this sweep"),
    ("{encoder: {L: {}}}", "per: 'encoder' is not another factor of this sweep"),
    ("{prior: {flow3: {}}}", "per prior: levels are normal, flow2; unknown: flow3"),
])
def test_per_naming_a_non_factor_or_level_is_located(tmp_path, per, message):
    path, text = tiny(tmp_path, "{per: " + per + "}")
    found = problems(path)
    assert len(found) == 1
    assert found[0].message == message
    assert found[0].location.file == str(path) and found[0].location.line == line_of(text, "    NL: {per:")
    assert found[0].path[:4] == ("sweep", "encoder", "NL", "per")


def test_repeats_must_be_at_least_one(tmp_path):
    path, text = tiny(tmp_path, replace=("repeats: 2", "repeats: 0"))
    found = problems(path)
    assert found and found[0].location.line == line_of(text, "repeats: 0")


def test_a_misspelt_study_key_is_an_error(tmp_path):
    path, text = tiny(tmp_path, replace=("  columns: [encoder]", "  colums: [encoder]"))
    found = problems(path)
    assert found and "colums" in found[0].message and found[0].location.line == line_of(text, "colums")


@pytest.mark.parametrize("metric, message", [
    ("test.nelb", "the runs evaluate no test loss 'nelb' (evaluate.losses: rec, kl, nelbo); did you mean 'nelbo'?"),
    ("tset.nelbo", "metrics.json has no section 'tset'"),
    ("time_per_epoch", "metrics.json has no 'time_per_epoch'"),
    ("test_accuracy", "test_accuracy is measured only with evaluate.accuracy set"),
])
def test_a_table_metric_the_runs_will_not_have_is_an_error(tmp_path, metric, message):
    # found before training: otherwise the study trains every run and then prints empty cells
    tables = f"  rows: [prior]\n  tables:\n    - {{metric: {metric}, title: T}}\n"
    path, text = tiny(tmp_path, replace=("  rows: [prior]\n", tables))
    found = problems(path)
    assert len(found) == 1 and message in found[0].message, [p.message for p in found]
    assert found[0].location.line == line_of(text, f"metric: {metric}")


def test_table_metrics_the_runs_will_have_are_accepted(tmp_path):
    tables = ("  rows: [prior]\n  tables:\n    - {metric: test.kl, title: KL}\n"
              "    - {metric: train_last_epoch.rec, title: R}\n    - {metric: trainable, title: W}\n")
    path, _ = tiny(tmp_path, replace=("  rows: [prior]\n", tables))
    assert len(load_runs(path)) == 4


def test_a_study_section_without_sweep_or_repeats_is_an_error(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(tiny_digits_vae("plain", "study:\n  columns: []\n"))
    found = problems(path)
    assert found and "this spec has neither: add a sweep section or repeats: 2" in found[0].message
    assert found[0].location.line == path.read_text().splitlines().index("study:") + 1
