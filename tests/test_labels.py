"""Labels of generated samples and the collapse warning (genspec/measure/labels.py, report.py).

A conditional GAN on the 8x8 digits is scored by a tiny classifier run: its report shows the
asked-label x classified-class table and picture. The collapse rules are checked on metrics
that trip each one alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from genspec.measure import labels
from genspec.report.run_report import collapse_warnings
from spec_helpers import TINY_CONDITIONAL_GAN, TINY_DIGITS_CLASSIFIER, cli_in_process, tiny_digits_vae


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels")
    (folder / "c.yaml").write_text(TINY_DIGITS_CLASSIFIER)
    rc, _, err = cli_in_process("run", folder / "c.yaml", "--out", folder / "clf", "--no-progress")
    assert rc == 0, err
    return folder / "clf"


def conditional_run(tmp_path, classifier) -> tuple[dict, str]:
    spec = tmp_path / "g.yaml"
    spec.write_text(TINY_CONDITIONAL_GAN.replace(
        "evaluate: {losses: [d_loss, g_loss], grids: {}}",
        f"evaluate: {{losses: [d_loss, g_loss], grids: {{}}, extractor: {{classifier: {classifier}}}}}"))
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    return json.loads((tmp_path / "run" / "metrics.json").read_text()), (tmp_path / "run" / "report.md").read_text()


def test_conditional_run_reports_labels_per_asked_label(tmp_path, classifier):
    metrics, report = conditional_run(tmp_path, classifier)
    found = metrics["sample_labels"]
    counts = found["counts"]
    assert len(counts) == 10 and all(len(row) == 10 and sum(row) == labels.SAMPLES_PER_LABEL for row in counts)
    assert found["agreement"] == pytest.approx(sum(counts[k][k] for k in range(10)) / 1000)
    assert found["histogram"] == [sum(row[c] for row in counts) for c in range(10)]
    assert 0 <= found["pixel_spread"] <= 1 and found["classifier"] == str(classifier)
    assert "## Labels of generated samples" in report and "![labels](labels.png)" in report
    assert f"Label agreement: **{found['agreement']:.1%}**" in report
    assert "| 0 | " + " | ".join(str(v) for v in counts[0]) in report
    assert (tmp_path / "run" / "labels.png").stat().st_size > 1000


def test_label_counts_are_deterministic(tmp_path, classifier):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert conditional_run(tmp_path / "one", classifier)[0]["sample_labels"] == \
        conditional_run(tmp_path / "two", classifier)[0]["sample_labels"]


def test_generate_for_label_fixes_the_label():
    """The generator is asked for label k: its condition is the one-hot of k, other conditions are drawn."""
    from genspec.compiler.priors import CategoricalPrior, NormalPrior

    class Echo(torch.nn.Module):  # returns the conditions it was given
        def forward(self, z, label, other):
            return torch.cat([label, other], 1)

    label, other = CategoricalPrior((10,)), CategoricalPrior((3,))
    out = labels.generate_for_label(Echo(), NormalPrior((2,)), [label, other], 0, 7, 5, torch.device("cpu"))
    assert torch.equal(out[:, :10], torch.nn.functional.one_hot(torch.full((5,), 7), 10).float())
    assert torch.equal(out[:, 10:].sum(1), torch.ones(5))


def test_unconditional_generator_gets_a_histogram_and_spread(tmp_path, classifier):
    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v", f"evaluate: {{grids: {{}}, extractor: {{classifier: {classifier}}}}}\n"))
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "v", "--no-progress")
    assert rc == 0, err
    found = json.loads((tmp_path / "v" / "metrics.json").read_text())["sample_labels"]
    assert sum(found["histogram"]) == labels.SPREAD_SAMPLES and len(found["histogram"]) == 10
    assert "counts" not in found
    assert "Classes given by" in (tmp_path / "v" / "report.md").read_text()


def test_without_a_classifier_only_the_spread(tmp_path):
    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v"))
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "v", "--no-progress")
    assert rc == 0, err
    found = json.loads((tmp_path / "v" / "metrics.json").read_text())["sample_labels"]
    assert set(found) == {"pixel_spread"} and found["pixel_spread"] > 0


@pytest.mark.parametrize("metrics, sign", [
    ({"fidelity": {"inception_score_mean": 1.004}}, "floor of 1"),
    ({"sample_labels": {"histogram": [393, 0, 1607, 0], "pixel_spread": 0.2}}, "80% of the generated samples are classified 2"),
    ({"sample_labels": {"pixel_spread": 0.0004}}, "per-pixel spread"),
])
def test_each_collapse_sign_warns(metrics, sign):
    (warning,) = collapse_warnings(metrics)
    assert sign in warning


def test_a_healthy_run_has_no_warning():
    assert collapse_warnings({"fidelity": {"inception_score_mean": 7.9},
                              "sample_labels": {"histogram": [100] * 10, "pixel_spread": 0.2}}) == []


def test_a_collapsed_run_shows_the_warning_first(tmp_path, classifier):
    """A generator with weights of std 1e-12 (init normal(0, 1e-12)) and a learning rate too small to move
    them draws one image whatever z and the label: the report's first lines say so."""
    text = TINY_CONDITIONAL_GAN.replace("    input: z\n", "    input: z\n    init: normal(0, 1e-12)\n", 1)
    text = text.replace("gen: {minimize: g_loss, optimizer: adam(1e-3)}", "gen: {minimize: g_loss, optimizer: sgd(1e-12)}")
    spec = tmp_path / "flat.yaml"
    spec.write_text(text)
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "flat", "--no-progress")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "flat" / "metrics.json").read_text())
    assert metrics["sample_labels"]["pixel_spread"] < 1e-6
    head = (tmp_path / "flat" / "report.md").read_text().split("## Test-set losses")[0]
    assert "Warning: this run looks collapsed" in head and "per-pixel spread" in head
