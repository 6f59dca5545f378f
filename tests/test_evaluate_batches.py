"""Evaluation counts every test example, whatever evaluate.batch_size leaves in the last batch."""

from __future__ import annotations

import pytest
import torch

import genspec
from genspec.compiler.model import Model
from genspec.data.datasets import load_data
from genspec.measure.evaluate import accuracy, evaluate_losses
from genspec.train.loop import epoch_steps
from spec_helpers import TINY_DIGITS_CLASSIFIER

TEST_EXAMPLES = 65  # 4 x 16 + 1: a last batch of one


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.yaml"
    path.write_text(TINY_DIGITS_CLASSIFIER.replace("test: 64", f"test: {TEST_EXAMPLES}"))
    spec = genspec.load(path)
    torch.manual_seed(0)
    return spec, Model(spec, torch.device("cpu")), load_data(spec.data, 0, "memory", 0)


def _with_eval_batch(spec, size: int):
    spec.evaluate = {**spec.evaluate, "batch_size": size}
    return spec


@pytest.mark.parametrize("size", [1, 16, 64])
def test_losses_and_accuracy_do_not_depend_on_the_evaluation_batch(classifier, size):
    spec, model, splits = classifier
    assert len(splits.test) == TEST_EXAMPLES
    whole = _with_eval_batch(spec, TEST_EXAMPLES)
    expected_loss, expected_accuracy = evaluate_losses(whole, model, splits.test), accuracy(whole, model, splits.test)
    batched = _with_eval_batch(spec, size)
    got = evaluate_losses(batched, model, splits.test)
    assert got["nll"] == pytest.approx(expected_loss["nll"], rel=1e-6)
    assert accuracy(batched, model, splits.test) == expected_accuracy
    # every example counted: the share is a whole number of the 65
    assert (expected_accuracy * TEST_EXAMPLES) == pytest.approx(round(expected_accuracy * TEST_EXAMPLES))


def test_the_last_example_decides_the_accuracy(classifier):
    """Mislabel only the last example (the batch of one): the accuracy moves by exactly 1/65."""
    spec, model, splits = classifier
    spec = _with_eval_batch(spec, 16)
    before = accuracy(spec, model, splits.test)
    with torch.no_grad():
        logp = model.networks["classifier"](splits.test.x[-1:])
    right = int(logp.argmax(1)) == int(splits.test.y[-1])
    original = splits.test.y[-1].clone()
    splits.test.y[-1] = (original + 1) % 10 if right else logp.argmax(1)[0]
    try:
        after = accuracy(spec, model, splits.test)
    finally:
        splits.test.y[-1] = original
    assert after - before == pytest.approx((-1 if right else 1) / TEST_EXAMPLES)


@pytest.mark.parametrize("examples, batch_size, steps", [(65, 16, 4), (64, 16, 4), (66, 16, 5), (65, 1, 65)])
def test_epoch_steps_counts_the_batches_trained(examples, batch_size, steps):
    assert epoch_steps({"batch_size": batch_size}, examples) == steps


def test_epoch_steps_counts_the_batches_every_process_trains():
    # 7 examples in batches of 4 over 2 processes: the last batch would give one rank a single example
    assert epoch_steps({"batch_size": 4}, 7) == 2
    assert epoch_steps({"batch_size": 4}, 7, world_size=2) == 1


def test_the_lowest_test_loss_and_its_epoch_are_kept_for_papers_that_report_the_best_checkpoint():
    from genspec.measure.evaluate import best_test_losses
    from genspec.report.run_report import flat_results

    history = [{"epoch": 1, "test": {"m": 3.0, "rec": 2.0}}, {"epoch": 2, "test": {"m": 1.5, "rec": float("nan")}},
               {"epoch": 3, "test": {"m": 2.0, "rec": 2.5}}]
    found = best_test_losses(history)
    assert found == {"best_test": {"m": 1.5, "rec": 2.0}, "best_test_epoch": {"m": 2, "rec": 1}}
    assert flat_results({"test": {"m": 2.0}, **found})["m_best"] == 1.5
