"""The reproduction ledger (genspec/experiments/reproduce.py, `genspec reproduce`).

Status rules and rank correlation are checked on numbers; the ledger's files on a small project
of digit specs: collected from run folders written by hand (so every status is forced), and
trained for real where a run is missing, including the classifier run an extractor needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from genspec.experiments import reproduce as rp
from spec_helpers import REPO, TINY_CONDITIONAL_GAN, TINY_DIGITS_CLASSIFIER, cli_in_process, tiny_digits_vae

ROW_KEYS = {"spec", "metric", "paper", "ours", "std", "epochs", "seconds", "device", "commit", "status", "reason"}


# ---------------------------------------------------------------- status and ranks

@pytest.mark.parametrize("metric, paper, ours, expected", [
    ("inception_score_mean", 7.859, 7.6, "reproduced"),        # 3% short
    ("inception_score_mean", 7.859, 9.0, "reproduced"),        # better than the paper
    ("inception_score_mean", 7.859, 6.5, "within_tolerance"),  # 17% short
    ("inception_score_mean", 7.859, 1.004, "below"),
    ("fid", 100.0, 104.0, "reproduced"),
    ("fid", 100.0, 80.0, "reproduced"),                        # lower is better
    ("fid", 100.0, 119.0, "within_tolerance"),
    ("fid", 100.0, 121.0, "below"),
    ("nelbo", -79.23, -76.0, "reproduced"),                    # a negative value: the scale is its size
    ("nelbo", -79.23, -60.0, "below"),
    ("rt", 90.0, 80.0, "within_tolerance"),                    # no known direction: distance either way
    ("rt", 90.0, 100.0, "within_tolerance"),
    ("inception_score_std", 0.037, 0.020, "below"),            # a spread is judged by distance, not size
    ("test_accuracy", 0.9886, 0.9884, "reproduced"),
    ("is", 2.0, None, "not_run"),
    ("is", 2.0, math.nan, "not_run"),
])
def test_status_rules(metric, paper, ours, expected):
    assert rp.status(metric, paper, ours) == expected


def test_direction_of_metric_names():
    assert rp.direction("fid") == rp.direction("kernel_inception_distance_mean") == "lower"
    assert rp.direction("m_global_best") == rp.direction("nelbo") == rp.direction("rec") == "lower"
    assert rp.direction("is") == rp.direction("inception_score_mean") == rp.direction("test_accuracy") == "higher"
    assert rp.direction("rt") == rp.direction("inception_score_std") == "closer"


def test_spearman():
    assert rp.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rp.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rp.ranks([5.0, 1.0, 5.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]  # ties share their average rank
    # with ties: Pearson's r of the ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert rp.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert rp.spearman([1, 1, 1], [1, 2, 3]) is None


# ---------------------------------------------------------------- a small project, collected

def reported_vae(name: str, reported: dict) -> str:
    return tiny_digits_vae(name, "source: " + json.dumps({"paper": "A paper", "table": f"Table 1 ({name})",
                                                           "reported": reported}) + "\n")


def write_run(project: Path, name: str, test: dict, epochs: int = 1, times=(1.5, 2.5)) -> Path:
    """A finished run folder as genspec writes it, with chosen numbers."""
    folder = project / "reports" / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "time_s": t}) + "\n"
                                                  for i, t in enumerate(times)))
    metrics = {"name": name, "epochs": epochs, "seed": 0, "device": "cpu", "test": test,
               "eval_time_s": 1.0, "commit": "abc123",
               "hardware": {"cpu": "Test CPU", "torch_threads": 2, "torch": "2.x"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "specs" / "variants").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    specs = {"a": {"nelbo": 10.0}, "b": {"nelbo": 20.0}, "c": {"nelbo": 30.0, "rec": 5.0}}
    for name, reported in specs.items():
        (root / "specs" / "variants" / f"{name}.yaml").write_text(reported_vae(name, reported))
    (root / "specs" / "missing.yaml").write_text(reported_vae("missing", {"nelbo": 1.0}))
    (root / "specs" / "plain.yaml").write_text(tiny_digits_vae("plain"))  # no reported numbers: not a row
    write_run(root, "a", {"nelbo": 10.2})          # reproduced
    write_run(root, "b", {"nelbo": 23.0})          # within tolerance
    write_run(root, "c", {"nelbo": 45.0})          # below; rec not measured
    (root / "reports" / rp.REASONS).write_text("c: the reason found by experiment\n")
    return root


def test_collect_writes_the_ledger(project):
    rc, out, err = cli_in_process("reproduce", project / "specs", "--collect")
    assert rc == 0, err
    rows = json.loads((project / "reports" / rp.LEDGER_JSON).read_text())
    assert all(ROW_KEYS <= set(row) for row in rows)
    by = {(row["name"], row["metric"]): row for row in rows}
    assert set(by) == {("a", "nelbo"), ("b", "nelbo"), ("c", "nelbo"), ("c", "rec"), ("missing", "nelbo")}
    assert [by[k]["status"] for k in [("a", "nelbo"), ("b", "nelbo"), ("c", "nelbo"), ("missing", "nelbo")]] == \
        ["reproduced", "within_tolerance", "below", "not_run"]
    a = by["a", "nelbo"]
    assert (a["paper"], a["ours"], a["epochs"], a["seconds"], a["commit"], a["device"]) == (10.0, 10.2, 1, 5.0, "abc123", "cpu")
    assert a["spec"] == "specs/variants/a.yaml" and a["protocol"] == "test split"
    assert by["c", "nelbo"]["reason"] == "the reason found by experiment"
    assert by["c", "rec"]["status"] == "not_run" and "did not measure" in by["c", "rec"]["reason"]
    missing = by["missing", "nelbo"]
    assert "no finished run in" in missing["reason"] and missing["command"] == "genspec run specs/missing.yaml"
    assert missing["ours"] is None and missing["seconds"] is None
    md = (project / "reports" / rp.LEDGER_MD).read_text()
    assert "| `specs/variants/a.yaml` | Table 1 (a) | nelbo | 10 | 10.2 | reproduced |" in md
    assert "genspec run specs/missing.yaml" in md and "Test CPU (2 threads)" in md
    # three measured nelbo rows of one paper: their rank agreement is printed and written
    assert "Spearman 1" in out and "| A paper | the paper's text | nelbo | 3 | 1 |" in md
    assert "1 reproduced · 1 within_tolerance · 1 below · 2 not_run" in md


def test_rows_of_another_reading_are_ranked_apart(project):
    """A second reading of row b shares its paper value: ranked with the others it would pull the
    correlation of the paper's own reading down (here from 1 to 0.63)."""
    text = reported_vae("b_other", {"nelbo": 20.0}).replace('"table": "Table 1 (b_other)"',
                                                             '"table": "Table 1 (b_other)", "reading": "wider"')
    (project / "specs" / "variants" / "b_other.yaml").write_text(text)
    write_run(project, "b_other", {"nelbo": 50.0})
    rc, out, err = cli_in_process("reproduce", project / "specs", "--collect")
    assert rc == 0, err
    rows = {row["name"]: row for row in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())
            if row["metric"] == "nelbo"}
    assert rows["b_other"]["reading"] == "wider" and rows["a"]["reading"] == rp.PAPER_TEXT
    md = (project / "reports" / rp.LEDGER_MD).read_text()
    assert "| A paper | the paper's text | nelbo | 3 | 1 |" in md and "wider" not in md.split("## Rank agreement")[1]
    four = [rows[n] for n in ("a", "b", "c", "b_other")]
    assert rp.spearman([r["paper"] for r in four], [r["ours"] for r in four]) == pytest.approx(0.6325, abs=1e-4)


def test_collect_is_repeatable_and_trains_nothing(project):
    for _ in range(2):
        assert cli_in_process("reproduce", project / "specs", "--collect")[0] == 0
        first = [(project / "reports" / f).read_bytes() for f in (rp.LEDGER_MD, rp.LEDGER_JSON)]
    assert cli_in_process("reproduce", project / "specs", "--collect")[0] == 0
    assert [(project / "reports" / f).read_bytes() for f in (rp.LEDGER_MD, rp.LEDGER_JSON)] == first
    assert not (project / "reports" / "missing").exists()


def test_named_files_and_folders_only(project):
    rc, _, err = cli_in_process("reproduce", project / "specs" / "variants", project / "specs" / "variants" / "a.yaml",
                                "--collect")
    assert rc == 0, err
    rows = json.loads((project / "reports" / rp.LEDGER_JSON).read_text())
    assert sorted({row["name"] for row in rows}) == ["a", "b", "c"]  # a.yaml once


def test_a_reading_fragment_is_mixed_in_and_not_taken_for_a_spec(project):
    """A fragment under a `_` folder is a reading that row specs list in `extends`: a folder target
    skips it (alone it is no spec), and the row that mixes it in carries its reading."""
    (project / "specs" / "_readings").mkdir()
    (project / "specs" / "_readings" / "wide.yaml").write_text('source: {reading: "wider"}\ntrain: {epochs: 3}\n')
    (project / "specs" / "variants" / "b_wide.yaml").write_text(
        'extends: [b.yaml, ../_readings/wide.yaml]\nname: b_wide\nsource: {table: "Table 1 (b), wider"}\n')
    write_run(project, "b_wide", {"nelbo": 22.5}, epochs=3)
    rc, out, err = cli_in_process("reproduce", project / "specs", "--collect")
    assert rc == 0, err
    rows = {row["name"]: row for row in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    assert rows["b_wide"]["reading"] == "wider" and rows["b_wide"]["paper"] == 20.0
    assert rows["b_wide"]["epochs"] == 3 and rows["b_wide"]["status"] == "within_tolerance"
    assert not any("_readings" in row["spec"] for row in rows.values())


def test_targets_without_reported_numbers_or_missing(project):
    rc, _, err = cli_in_process("reproduce", project / "specs" / "plain.yaml", "--collect")
    assert rc == 1 and "source.reported" in err
    rc, _, err = cli_in_process("reproduce", project / "specs" / "nothing.yaml", "--collect")
    assert rc == 1 and "no such spec file or folder" in err


def test_reasons_file_that_is_not_yaml(project):
    (project / "reports" / rp.REASONS).write_text("c: [unclosed\n")
    rc, _, err = cli_in_process("reproduce", project / "specs", "--collect")
    assert rc == 2 and rp.REASONS in err and "Traceback" not in err


def test_absent_data_is_named(tmp_path, monkeypatch):
    """The CelebA spec on a machine without CelebA: not run, and the ledger says why and how."""
    monkeypatch.setenv("GENSPEC_DATA", str(tmp_path))
    book = rp.reproduce([str(REPO / "specs" / "celeba_vae.yaml")], collect_only=True, out=str(tmp_path / "ledger"),
                        say=lambda *_: None)
    row = book["rows"][0]
    assert row["status"] == "not_run" and row["reason"].startswith("data absent here: no celeba under data.root")
    assert row["command"] == "genspec run specs/celeba_vae.yaml"


# ---------------------------------------------------------------- trained for real

CGAN_WITH_IS = TINY_CONDITIONAL_GAN.replace(
    "evaluate: {losses: [d_loss, g_loss], grids: {}}",
    "evaluate:\n  losses: [d_loss, g_loss]\n  grids: {}\n  is: {samples: 100, splits: 2}\n"
    "  extractor: {classifier: reports/digits_classifier}\n"
    "source: {paper: Coursework, table: Table 1, extractor: classifier, reported: {inception_score_mean: 3.0}}")


def test_reproduce_trains_the_classifier_then_the_model(tmp_path):
    root = tmp_path / "project"
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "digits_classifier.yaml").write_text(TINY_DIGITS_CLASSIFIER)
    (root / "specs" / "cgan.yaml").write_text(CGAN_WITH_IS)
    said = []
    book = rp.reproduce([str(root / "specs" / "cgan.yaml")], progress=False, say=said.append)
    assert (root / "reports" / "digits_classifier" / "metrics.json").exists()
    assert any("training" in line and "digits_classifier" in line for line in said)
    assert any("tiny_cgan took" in line for line in said)
    (row,) = book["rows"]
    assert row["status"] in ("reproduced", "within_tolerance", "below") and 1.0 <= row["ours"] <= 10.0
    assert row["std"] is not None and row["seconds"] > 0 and row["device"] == "cpu"
    assert row["comparable"] and "of the classifier run" in row["protocol"] and "in 2 splits" in row["protocol"]
    assert row["commit"]  # a commit, or "not recorded" outside a git checkout
    metrics = json.loads((root / "reports" / "tiny_cgan" / "metrics.json").read_text())
    assert metrics["hardware"]["torch_threads"] >= 1 and metrics["train_time_s"] > 0
    # a second reproduce finds both runs finished and trains nothing
    said.clear()
    again = rp.reproduce([str(root / "specs" / "cgan.yaml")], progress=False, say=said.append)
    assert again["rows"] == book["rows"] and not any("training" in line for line in said)


def test_reproduce_resumes_an_interrupted_run(tmp_path):
    root = tmp_path / "project"
    (root / "specs").mkdir(parents=True)
    spec = root / "specs" / "v.yaml"
    spec.write_text(reported_vae("v", {"nelbo": 100.0}).replace("epochs: 1", "epochs: 2"))
    # an interrupted run: trained for one epoch of two, its checkpoint kept, no metrics.json
    rc, _, err = cli_in_process("run", spec, "--out", root / "reports" / "v", "--set", "train.epochs=1", "--no-progress")
    assert rc == 0, err
    (root / "reports" / "v" / "metrics.json").unlink()
    said = []
    book = rp.reproduce([str(spec)], progress=False, say=said.append)
    assert any("resuming v" in line for line in said)
    history = [json.loads(line) for line in (root / "reports" / "v" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "epoch" in h] == [1, 2]
    assert book["rows"][0]["epochs"] == 2 and book["rows"][0]["ours"] is not None


def test_shipped_reasons_file_names_shipped_specs():
    """Every spec the committed reasons file explains exists, so a renamed spec cannot leave a stale reason."""
    path = REPO / "reports" / rp.REASONS
    if not path.exists():
        pytest.skip("no reasons file committed")
    names = {yaml.safe_load(p.read_text()).get("name") for p in (REPO / "specs").rglob("*.yaml")}
    assert set(yaml.safe_load(path.read_text())) <= names


def test_a_partial_reproduce_keeps_the_other_rows(project):
    assert cli_in_process("reproduce", project / "specs", "--collect")[0] == 0
    before = {(r["name"], r["metric"]): r for r in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    (project / "reports" / "a" / "metrics.json").write_text(
        (project / "reports" / "a" / "metrics.json").read_text().replace("10.2", "30.0"))
    assert cli_in_process("reproduce", project / "specs" / "variants" / "a.yaml", "--collect")[0] == 0
    after = {(r["name"], r["metric"]): r for r in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    assert set(after) == set(before)  # b, c and missing stay in the ledger
    assert after["a", "nelbo"]["status"] == "below" and after["b", "nelbo"] == before["b", "nelbo"]
    # a spec that no longer exists leaves the ledger at the next reproduce
    (project / "specs" / "missing.yaml").unlink()
    assert cli_in_process("reproduce", project / "specs" / "variants", "--collect")[0] == 0
    names = {r["name"] for r in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    assert names == {"a", "b", "c"}


def test_a_measured_row_stays_when_its_run_folder_is_gone(project):
    """Run folders are not committed, the ledger is: collecting in a fresh checkout keeps what was
    measured, and only a new measurement replaces it."""
    assert cli_in_process("reproduce", project / "specs", "--collect")[0] == 0
    before = {(r["name"], r["metric"]): r for r in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    assert before["a", "nelbo"]["status"] != "not_run"
    (project / "reports" / "a" / "metrics.json").unlink()
    assert cli_in_process("reproduce", project / "specs", "--collect")[0] == 0
    after = {(r["name"], r["metric"]): r for r in json.loads((project / "reports" / rp.LEDGER_JSON).read_text())}
    assert after["a", "nelbo"] == before["a", "nelbo"]
    assert len(after) == len(before)  # kept, not doubled by a not_run row
