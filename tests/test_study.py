"""Studies end to end: a 2 x 2 sweep with 2 repeats of one epoch on the 8x8 digits, run through
`genspec run`: the run folders, study.md (rows x columns, M and Std, declared level order), one
CSV per table, standard deviations checked against the runs' own metrics.json, links, skipping
finished runs and resuming an interrupted one.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import textwrap
from pathlib import Path

import pytest

from genspec.experiments.study import StudyRun, metric_value, stack_choice, write_study_report
from genspec.lang.sweep import Run
from spec_helpers import run_cli as run_subprocess, tiny_digits_vae
from spec_helpers import cli_in_process as run_cli

ENCODERS, PRIORS = ["L", "NL"], ["normal", "flow2"]  # declared order; alphabetical would put flow2 first
SEEDS = [0, 1]
SPEC = tiny_digits_vae("tiny_study", textwrap.dedent("""\
    evaluate:
      losses: [rec, kl, nelbo]
      grids: [samples, reconstructions]
      grid_size: 2
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
      tables:
        - {metric: test.nelbo, title: "Negative ELBO"}
        - {metric: trainable, title: "Trainable weights"}
        - {metric: test.rec, title: "Reconstruction"}
    """))
TABLES = {"test.nelbo": "Negative ELBO", "trainable": "Trainable weights", "test.rec": "Reconstruction"}
ENC_TRAINABLE = {"L": (64 * 16 + 16) + (16 * 4 + 4), "NL": 0}
DEC_TRAINABLE = (2 * 16 + 16) + (16 * 64 + 64)
FLOW2 = 2 * 2 * ((1 * 8 + 8) + (8 * 8 + 8) + (8 * 1 + 1))  # 2 flows, each an s and a t net, D = 2, hidden 8




def run_id(encoder: str, prior: str) -> str:
    return f"encoder={encoder},prior={prior}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    spec = root / "tiny_study.yaml"
    spec.write_text(SPEC)
    out = root / "out"
    rc, stdout, err = run_cli("run", spec, "--out", out, "--no-progress")
    assert rc == 0, err
    assert "study: 8 run(s) trained, 0 skipped" in err
    return spec, out, err


def metrics_of(out: Path) -> dict:
    return {(e, p, s): json.loads((out / run_id(e, p) / f"seed{s}" / "metrics.json").read_text())
            for e in ENCODERS for p in PRIORS for s in SEEDS}


def section(markdown: str, title: str) -> list[list[str]]:
    """The table under `## title` as rows of cells (header first, the --- line dropped)."""
    block = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def close(cell: str, value: float) -> bool:
    """A printed cell (2,244 / 11.70 / 0.0478) shows `value` to its printed precision."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-12


def test_every_configuration_and_seed_has_a_run_folder(study):
    _, out, _ = study
    folders = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/*/metrics.json"))
    assert folders == sorted(f"{run_id(e, p)}/seed{s}" for e in ENCODERS for p in PRIORS for s in SEEDS)
    for (e, p, s), metrics in metrics_of(out).items():
        assert metrics["seed"] == s and metrics["epochs"] == 1
        assert set(metrics["test"]) == {"rec", "kl", "nelbo"}
        resolved = (out / run_id(e, p) / f"seed{s}" / "spec.resolved.yaml").read_text()
        assert f"seed: {s}" in resolved and "sweep" not in resolved
    # the seeds differ: the two repeats are different runs
    all_metrics = metrics_of(out)
    assert all_metrics[("L", "normal", 0)]["test"] != all_metrics[("L", "normal", 1)]["test"]


def test_study_md_lays_out_each_table(study):
    _, out, _ = study
    text = (out / "study.md").read_text()
    assert text.startswith("# Study tiny_study\n")
    assert "8 of 8 runs finished; 2 seeds per configuration" in text and "rows prior, columns encoder" in text
    metrics = metrics_of(out)
    titles = re.findall(r"^## (.+)$", text, re.M)
    assert titles == [*TABLES.values(), "Runs"]  # the declared tables, in order
    for metric, title in TABLES.items():
        table = section(text, title)
        assert table[0] == ["prior", "L M", "L Std", "NL M", "NL Std"]  # columns in declared order
        assert [row[0] for row in table[1:]] == PRIORS  # rows in declared order (normal before flow2)
        for row in table[1:]:
            for i, encoder in enumerate(ENCODERS):
                values = [metric_value(metrics[(encoder, row[0], s)], metric) for s in SEEDS]
                assert close(row[1 + 2 * i], statistics.fmean(values)), (title, row)
                assert close(row[2 + 2 * i], statistics.stdev(values)), (title, row)
        assert f"`{metric}`" in text


def test_csv_per_table_with_mean_std_and_n(study):
    _, out, _ = study
    metrics = metrics_of(out)
    for metric in TABLES:
        path = out / f"study_{metric.replace('.', '_')}.csv"
        rows = list(csv.DictReader(path.open()))
        assert list(rows[0]) == ["prior", "encoder", "metric", "mean", "std", "n"]
        assert sorted((r["prior"], r["encoder"]) for r in rows) == sorted((p, e) for p in PRIORS for e in ENCODERS)
        for r in rows:
            values = [metric_value(metrics[(r["encoder"], r["prior"], s)], metric) for s in SEEDS]
            assert r["metric"] == metric and int(r["n"]) == 2
            assert float(r["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            # the sample standard deviation of the two seeds: |a - b| / sqrt(2)
            assert float(r["std"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, rel=1e-9)
            if metric.startswith("test."):
                assert float(r["std"]) > 0


def test_trainable_counts_include_the_flow(study):
    _, out, _ = study
    metrics = metrics_of(out)
    for (e, p, s), m in metrics.items():
        expected = ENC_TRAINABLE[e] + DEC_TRAINABLE + (FLOW2 if p == "flow2" else 0)
        assert metric_value(m, "trainable") == expected, (e, p)
        assert m["params"]["enc"]["frozen"] == (0 if e == "L" else 16 * 2 + 2 + 64 * 16 + 16)
    table = section((out / "study.md").read_text(), "Trainable weights")
    cells = {row[0]: row[1:] for row in table[1:]}
    assert cells["flow2"][0] == f"{ENC_TRAINABLE['L'] + DEC_TRAINABLE + FLOW2:,}"
    assert cells["normal"][2] == f"{DEC_TRAINABLE:,}"


def test_study_md_links_every_run(study):
    _, out, _ = study
    runs = (out / "study.md").read_text().split("## Runs\n", 1)[1]
    rows = [line for line in runs.splitlines() if line.startswith("| encoder=")]
    assert len(rows) == 8
    links = re.findall(r"\[(\w+\.?)\]\(([^)]+)\)", runs)
    assert len([name for name, _ in links if name == "report"]) == 8
    assert len([name for name, _ in links if name == "samples"]) == 8
    for _, target in links:
        assert (out / target).is_file(), target


def test_a_second_run_skips_every_finished_run(study, tmp_path):
    spec, out, _ = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("*/*/*") if p.name in ("metrics.json", "checkpoint.pt")}
    result = run_subprocess(["run", str(spec), "--out", str(copy), "--no-progress"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("finished earlier, skipped") == 8
    assert "study: 0 run(s) trained, 8 skipped" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "8 of 8 runs finished" in (copy / "study.md").read_text()


def test_a_changed_spec_stops_the_study_before_it_reuses_old_results(study, tmp_path):
    """Finished runs are skipped only if they were made from the spec as it is now: a changed
    learning rate stops the study before anything trains, naming a run and the key, and leaves
    every folder as it was."""
    spec, out, _ = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    rc, _, err = run_cli("run", spec, "--out", copy, "--no-progress", "--set", "train.batch_size=16")
    assert rc == 1 and "Traceback" not in err
    assert "was made from a different spec than this study's" in err and "(and 7 more run(s))" in err
    assert "train.batch_size: 32 -> 16" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == stamps


def test_more_epochs_resume_the_finished_runs_for_them(study, tmp_path):
    """train.epochs is what a resume may change: asked for more, each finished run trains on
    from its final checkpoint (here one configuration, with --only); asked for fewer, the study
    refuses, as a single run's --resume does."""
    spec, out, _ = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    only = ["--only", "encoder=L", "--only", "prior=flow2"]
    rc, _, err = run_cli("run", spec, "--out", copy, "--no-progress", "--set", "train.epochs=2", *only)
    assert rc == 0, err
    assert "study: 2 run(s) trained, 0 skipped" in err and err.count("(resumed)") == 2
    for seed in SEEDS:
        records = (copy / run_id("L", "flow2") / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in records] == [1, 2]
    rc, _, err = run_cli("run", spec, "--out", copy, "--no-progress", *only)
    assert rc == 1 and "already has 2 epochs, more than the 1 asked" in err


@pytest.mark.parametrize("damage", ["deleted", "half-written"])
def test_a_run_without_metrics_is_resumed_alone(study, tmp_path, damage):
    """metrics.json marks a run finished: without it, or with a torn one (damaged outside
    genspec, which writes it atomically), the run is resumed and evaluated again."""
    spec, out, _ = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    folder = copy / run_id("L", "flow2") / "seed1"
    before = json.loads((folder / "metrics.json").read_text())
    if damage == "deleted":
        (folder / "metrics.json").unlink()
    else:
        (folder / "metrics.json").write_text((folder / "metrics.json").read_text()[:40])
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("*/*/*") if p.name in ("metrics.json", "checkpoint.pt")
              and p != folder / "metrics.json"}
    assert (folder / "checkpoint.pt") in stamps
    rc, _, err = run_cli("run", spec, "--out", copy, "--no-progress")
    assert rc == 0, err
    assert "study: 1 run(s) trained, 7 skipped" in err
    assert re.search(r"^study: \[4/8\] encoder=L,prior=flow2 seed 1 \(resumed\)$", err, re.M), err
    assert err.count("finished earlier, skipped") == 7
    assert "epoch 1/1" not in err  # resumed after its one finished epoch: nothing retrained
    after = json.loads((folder / "metrics.json").read_text())
    assert after["test"] == before["test"] and after["params"] == before["params"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the checkpoint and the other runs untouched
    rc, _, err = run_cli("run", spec, "--out", copy, "--resume")
    assert rc == 1 and "a study resumes by itself" in err


def test_a_study_stopped_before_a_runs_first_checkpoint_goes_on(study, tmp_path, monkeypatch):
    import genspec.train.loop

    spec, _, _ = study
    out = tmp_path / "out"
    args = ["run", spec, "--out", out, "--no-progress", "--only", "encoder=L", "--only", "prior=normal",
            "--set", "repeats=1"]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(genspec.train.loop, "_one_epoch", interrupted)
        rc, _, err = run_cli(*args)
    assert rc == 130 and "interrupted" in err
    folder = out / run_id("L", "normal") / "seed0"
    assert folder.is_dir() and not (folder / "checkpoint.pt").exists()
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    assert (folder / "metrics.json").is_file()


def test_report_orders_levels_as_declared_and_marks_missing_cells(tmp_path):
    order = {"layers": ["fc", "conv"], "encoder": ["L", "PNL", "NL", "RKS"]}
    planned = []
    for layers in ("conv", "fc"):
        for encoder in ("RKS", "NL", "L", "PNL"):
            folder = tmp_path / f"layers={layers},encoder={encoder}" / "seed0"
            folder.mkdir(parents=True)
            if (layers, encoder) != ("conv", "PNL"):  # one run not finished
                value = 10.0 * (order["layers"].index(layers) + 1) + order["encoder"].index(encoder)
                (folder / "metrics.json").write_text(json.dumps({"test": {"nelbo": value}}))
            run = Run(f"layers={layers},encoder={encoder}", {"layers": layers, "encoder": encoder}, None)
            planned.append(StudyRun(run, None, 0, folder))
    section_ = {"out": tmp_path, "name": "ordered", "repeats": 1, "factors": ["layers", "encoder"], "order": order,
                "columns": ["encoder"], "rows": ["layers"], "tables": [{"metric": "test.nelbo", "title": "NELBO"}]}
    text = write_study_report(section_, planned).read_text()
    assert "7 of 8 runs finished" in text
    table = section(text, "NELBO")
    assert table[0] == ["layers", "L M", "L Std", "PNL M", "PNL Std", "NL M", "NL Std", "RKS M", "RKS Std"]
    assert table[1] == ["fc", "10.00", "0.0000", "11.00", "0.0000", "12.00", "0.0000", "13.00", "0.0000"]
    assert table[2] == ["conv", "20.00", "0.0000", "-", "-", "22.00", "0.0000", "23.00", "0.0000"]


def test_parallel_study_trains_the_same_runs_as_the_sequential_one(study, tmp_path):
    """`--parallel 2`: two runs at a time in worker processes; every run is the same computation
    (the same seed and data) as in the sequential study, so its metrics agree."""
    spec, sequential, _ = study
    out = tmp_path / "parallel"
    result = run_subprocess(["run", str(spec), "--out", str(out), "--no-progress", "--parallel", "2"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "8 run(s), 2 at a time" in result.stderr and "study: 8 run(s) trained, 0 skipped" in result.stderr
    before, after = metrics_of(sequential), metrics_of(out)
    for key, metrics in before.items():
        for name, value in metrics["test"].items():
            assert after[key]["test"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, name)
    assert (out / "study.md").is_file()


def test_parallel_is_for_studies_and_positive(tmp_path):
    (tmp_path / "s.yaml").write_text(SPEC)
    rc, _, err = run_cli("run", tmp_path / "s.yaml", "--out", tmp_path / "o", "--parallel", "0")
    assert rc == 1 and "--parallel must be a positive number of runs at once, got 0" in err
    rc, _, err = run_cli("run", "specs/quickstart.yaml", "--out", tmp_path / "q", "--parallel", "2")
    assert rc == 1 and "--parallel and --stack train the runs of a study" in err


@pytest.fixture(scope="module")
def stacked(study):
    spec, _, _ = study
    out = spec.parent / "stacked"
    rc, _, err = run_cli("run", spec, "--out", out, "--no-progress", "--stack")
    assert rc == 0, err
    return out, err


def test_stacked_study_trains_each_configurations_seeds_together(study, stacked):
    """`--stack`: the two seeds of every configuration as one stacked model; each run's folder is
    complete, and its results are those of the sequential study up to the noise draws."""
    _, sequential, _ = study
    out, err = stacked
    assert err.count("2 seeds as one stacked model") == 4 and "study: 8 run(s) trained, 0 skipped" in err
    before, after = metrics_of(sequential), metrics_of(out)
    for key, metrics in before.items():
        assert after[key]["params"] == metrics["params"]
        assert after[key]["test"]["nelbo"] == pytest.approx(metrics["test"]["nelbo"], rel=0.15), key
    assert "8 of 8 runs finished" in (out / "study.md").read_text()


def test_stacked_groups_train_in_parallel_workers(study, stacked, tmp_path):
    """`--stack --parallel 2`: each configuration's stacked seeds are one job, two jobs at a time;
    every group is the same computation as in the one-process stacked study."""
    spec, _, _ = study
    out = tmp_path / "stacked_parallel"
    result = run_subprocess(["run", str(spec), "--out", str(out), "--no-progress", "--stack", "--parallel", "2"],
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "study: 8 run(s) in 4 job(s), 2 at a time" in result.stderr
    assert result.stderr.count("2 seeds as one stacked model (--stack): done") == 4
    before, after = metrics_of(stacked[0]), metrics_of(out)
    assert sorted(before) == sorted(after)
    for key, metrics in before.items():
        for name, value in metrics["test"].items():
            assert after[key]["test"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, name)
    assert "8 of 8 runs finished" in (out / "study.md").read_text()


@pytest.mark.parametrize("flag, setting, device, stacks", [
    (None, "auto", "cuda", True), (None, "auto", "cpu", False), (None, None, "cuda", True), (None, None, "cpu", False),
    (True, "auto", "cpu", True), (False, "auto", "cuda", False),  # --stack / --no-stack
    (None, True, "cpu", True), (None, False, "cuda", False),      # study.stack: true / false
    (False, True, "cpu", False), (True, False, "cuda", True),     # the command line over the spec
])
def test_stack_choice_is_on_for_cuda_off_for_cpu_and_switchable(flag, setting, device, stacks):
    on, why = stack_choice(flag, setting, device)
    assert on is stacks
    expected = {True: "--stack", False: "--no-stack"}.get(flag) or (f"study.stack: {str(setting).lower()}"
                                                                   if setting not in (None, "auto") else None)
    assert why == expected if expected else why.startswith(f"auto: {'CUDA' if device == 'cuda' else device}")


def test_a_study_on_cpu_says_it_trains_one_seed_at_a_time(study):
    _, _, err = study
    assert err.count("study: each configuration's seeds one at a time (auto: cpu; stacking is the default on CUDA "
                     "only, --stack stacks here)") == 1
    assert "stacked model" not in err


def test_study_stack_in_the_spec_stacks_and_no_stack_overrides_it(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("\nstudy:\n", "\nstudy:\n  stack: true\n"))
    only = ["--only", "encoder=L", "--only", "prior=normal", "--no-progress"]
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "on", *only)
    assert rc == 0, err
    assert "study: encoder=L,prior=normal: 2 seeds as one stacked model (study.stack: true)" in err
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "off", "--no-stack", *only)
    assert rc == 0, err
    assert "one at a time (--no-stack)" in err and "stacked model" not in err
    rc, _, err = run_cli("validate", tmp_path / "s.yaml", "--set", "study.stack=sometimes")
    assert rc == 2 and "study.stack" in err


def test_the_table_layout_is_said_in_words_without_placeholders():
    from genspec.experiments.study import _axes

    assert _axes(["prior"], ["encoder"]) == "rows prior, columns encoder"
    assert _axes([], ["beta"]) == "columns beta"  # one factor: no '-' for the rows
    assert _axes([], []) == "one cell per table"


def test_repeats_without_a_sweep_is_a_study_of_one_configuration(tmp_path):
    """`repeats: 2` on a plain spec trains two seeds (it was read as one run before), each in its
    own folder, with the study report; validate says so, and --resume is refused as for any study."""
    spec = tmp_path / "repeated.yaml"
    spec.write_text(tiny_digits_vae("repeated", "repeats: 2\n"))
    rc, out, err = run_cli("validate", spec)
    assert rc == 0 and "repeated: 1 configuration x 2 seeds = 2 runs, each valid" in out, err
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "out", "--no-progress")
    assert rc == 0, err
    assert "study: 2 run(s) trained, 0 skipped" in err
    seeds = [json.loads((tmp_path / "out" / "run" / f"seed{s}" / "metrics.json").read_text())["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    assert "2 of 2 runs finished; 2 seeds per configuration" in (tmp_path / "out" / "study.md").read_text()
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "out", "--resume")
    assert rc == 1 and "a study resumes by itself" in err
    # more seeds: only the new one trains (repeats is the study's, not a run's, setting)
    rc, _, err = run_cli("run", spec, "--out", tmp_path / "out", "--no-progress", "--set", "repeats=3")
    assert rc == 0 and "study: 1 run(s) trained, 2 skipped" in err, err
    spec.write_text(tiny_digits_vae("repeated", "repeats: 0\n"))
    rc, _, err = run_cli("validate", spec)
    assert rc == 2 and "repeats" in err


def test_a_stacked_overwrite_that_fails_keeps_the_runs_it_was_replacing(tmp_path):
    """Under --overwrite the seeds of a stacked group are moved aside as a single run's are, not
    deleted: when the new stacked runs diverge, the old ones wait beside their folders and the
    study says where."""
    spec = tmp_path / "repeated.yaml"
    spec.write_text(tiny_digits_vae("repeated", "repeats: 2\n"))
    out = tmp_path / "out"
    rc, _, err = run_cli("run", spec, "--out", out, "--no-progress")
    assert rc == 0, err
    finished = {s: (out / "run" / f"seed{s}" / "metrics.json").read_text() for s in (0, 1)}
    rc, _, err = run_cli("run", spec, "--out", out, "--no-progress", "--stack", "--overwrite",
                         "--set", "objectives.vae.optimizer=adam(1e30)")
    assert rc == 1 and "the runs stopped" in err, err
    assert "2 run(s) that --overwrite was replacing are kept beside their folders" in err
    for s in (0, 1):
        assert (out / "run" / f".seed{s}.replaced" / "metrics.json").read_text() == finished[s]
    rc, _, err = run_cli("run", spec, "--out", out, "--no-progress", "--stack", "--overwrite")
    assert rc == 0, err
    assert not any(p.name.endswith(".replaced") for p in (out / "run").iterdir())
