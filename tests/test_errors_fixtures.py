"""Each spec in tests/fixtures/invalid/ is the quick-start with one mistake; `genspec validate` must report it
as exactly these located lines (`FILE:LINE:COL: key.path: message`), exit with status 2, and never print a
traceback. Every message below was checked by eye against its fixture: the line and column are those of the
offending key, list item or row, or of the offending token inside an expression or row, which is then shown
under its source line with a caret."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from spec_helpers import FIXTURES, run_cli

INVALID = FIXTURES / "invalid"

EXPECTED = {
    "yaml_syntax": [
        "yaml_syntax.yaml:10:9: (top level): YAML syntax error: mapping values are not allowed here",
    ],
    "unknown_key": [
        "unknown_key.yaml:41:3: train.epoch: unknown key 'epoch'; did you mean 'epochs'?",
    ],
    "wrong_type": [
        "wrong_type.yaml:42:3: train.batch_size: expected integer, got string 'sixty-four'",
    ],
    "bad_enum": [
        "bad_enum.yaml:9:3: data.dataset: 'cifar10' is not one of \"digits\", \"mnist\", \"fashion_mnist\", \"svhn\", \"celeba\", \"image_folder\"",
    ],
    "duplicate_key": [
        "duplicate_key.yaml:44:3: train.epochs: duplicate key",
    ],
    "missing_required": [
        "missing_required.yaml:2:1: (top level): missing required key 'name'",
    ],
    "undefined_network": [
        "undefined_network.yaml:32:10: graph.x_rec: unknown op or network 'decoder'; did you mean 'dec'?",
        "      x_rec: decoder(z)",  # the line as written, and a caret under the offending token
        "             ^",
    ],
    "undefined_network_objective": [
        "undefined_network_objective.yaml:39:30: objectives.vae.networks[2]: no network named 'disc' to train",
    ],
    "undefined_tensor": [
        "undefined_tensor.yaml:35:14: losses.rec: undefined name 'x_recon'; did you mean 'x_rec'?",
        "      rec: sqerr(x_recon, x) / (2 * sigma2)",
        "                 ^",
    ],
    "graph_cycle": [
        "graph_cycle.yaml:30:3: graph.q: cycle: q -> z -> x_rec -> q",
    ],
    "bad_row": [
        "bad_row.yaml:20:15: networks.enc.layers[2]: unexpected 'relu': expected 'fc N' or 'fc HxWxC' and optional 'bias=false'",
        "          - fc 64 relu",
        "                  ^",
    ],
    "shape_mismatch_loss": [
        "shape_mismatch_loss.yaml:28:9: networks.dec.layers[3]: output 1x7x7 does not match 1x8x8 in sqerr (losses.rec)",
    ],
    "shape_mismatch_network": [
        "shape_mismatch_network.yaml:20:9: networks.enc.layers[2]: output 64 does not fit dec's input 8 (graph.x_rec)",
    ],
    "network_input_mismatch": [
        "network_input_mismatch.yaml:32:3: graph.x_rec: dec expects input 8, got 1x8x8",
    ],
    "wrong_argument_kind": [
        "wrong_argument_kind.yaml:34:3: graph.prior_draw: rsample: argument 1 must be a dist, got a tensor",
    ],
    "two_optimisers": [
        "two_optimisers.yaml:40:3: objectives.dec: objectives 'vae' and 'dec' both train network 'dec', and without "
        "train.phases one phase updates every objective: one step would add their gradients and step it with both "
        "optimisers; give each a phase of its own, e.g. phases: [{update: [vae]}, {update: [dec], batch: same}]",
    ],
    "untrained_network": [
        "untrained_network.yaml:22:3: networks.dec: network 'dec' has 17152 trainable parameters but no objective "
        "trains it (add an objective, or `freeze: true`)",
    ],
    "frozen_network_trained": [
        "frozen_network_trained.yaml:41:9: objectives.vae.networks: nothing for this objective to train: 'enc', 'dec' "
        "are entirely frozen",
    ],
    "loss_ignores_network": [
        "loss_ignores_network.yaml:39:31: objectives.vae.minimize: the loss does not depend on network 'dec', so this "
        "objective cannot train it",
    ],
    "loss_not_scalar": [
        "loss_not_scalar.yaml:35:3: losses.rec: a loss must be a scalar, but this is a tensor of shape 1x8x8; reduce it "
        "with mean(...) or sum(...)",
    ],
    # a loss that fails to parse is reported once, not also as missing from evaluate.losses
    "bad_expression": [
        "bad_expression.yaml:36:14: losses.kl: cannot parse 'kl(q, z': expected ')', found the end (at character 8)",
        "      kl: kl(q, z",
        "                 ^",
    ],
    # each missing key is named, at the top-level mapping
    "missing_two_required": [
        "missing_two_required.yaml:2:1: (top level): missing required key 'name'",
        "missing_two_required.yaml:2:1: (top level): missing required key 'objectives'",
    ],
    # 'range: [0, 1' on line 10 never closes: the parser gives up at the ':' of 'split:' (11:8) and the
    # message says where the flow sequence opened (the '[' at 10:10)
    "yaml_unclosed_bracket": [
        "yaml_unclosed_bracket.yaml:11:8: (top level): YAML syntax error: while parsing a flow sequence "
        "(opened at 10:10): expected ',' or ']', but got ':'",
    ],
}

_RESULTS: dict = {}


def _run_all() -> None:
    """One `genspec validate` subprocess per fixture, run side by side (each takes ~0.4 s to start)."""
    names = sorted(p.stem for p in INVALID.glob("*.yaml"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        for name, result in zip(names, pool.map(lambda n: run_cli(["validate", f"{n}.yaml"], cwd=INVALID), names)):
            _RESULTS[name] = result


def validate_fixture(name: str):
    if not _RESULTS:
        _run_all()
    result = _RESULTS[name]
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    return result.stderr.splitlines()


def test_every_fixture_has_an_expectation():
    on_disk = {p.stem for p in INVALID.glob("*.yaml")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_fixture_is_reported_exactly(name):
    assert validate_fixture(name) == EXPECTED[name]


def test_unclosed_bracket_names_the_line_that_opened_it():
    (line,) = validate_fixture("yaml_unclosed_bracket")
    assert line.startswith("yaml_unclosed_bracket.yaml:") and "YAML syntax error: while parsing a flow sequence" in line
    assert "(opened at 10:10)" in line  # line 10 is 'range: [0, 1', and its '[' is in column 10


def test_several_invalid_specs_at_once_report_every_problem():
    names = ["unknown_key", "bad_row", "graph_cycle"]
    result = run_cli(["validate", *[f"{n}.yaml" for n in names]], cwd=INVALID)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [line for n in names for line in EXPECTED[n]]


def test_valid_and_invalid_specs_together():
    result = run_cli(["validate", "specs/quickstart.yaml", str(INVALID / "wrong_type.yaml")])
    assert result.returncode == 2
    assert result.stdout == "specs/quickstart.yaml: ok (quickstart: enc 17,616, dec 17,152 parameters)\n"
    assert result.stderr.splitlines() == [str(INVALID) + "/" + EXPECTED["wrong_type"][0]]


def test_missing_spec_file():
    result = run_cli(["validate", "no/such/spec.yaml"])
    assert (result.returncode, result.stderr) == (2, "no/such/spec.yaml: (top level): no such file\n")
