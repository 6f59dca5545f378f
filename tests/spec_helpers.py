"""Shared helpers for the tests: spec texts, the front-half check, and the CLI in and out of process.

Imported by the test modules as a plain module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from genspec.errors import Collector, SpecError
from genspec.graph.dependencies import build_graph
from genspec.lang.loader import load_text
from genspec.lang.validate import validate

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "specs" / "quickstart.yaml"
QUICKSTART_TEXT = QUICKSTART.read_text()
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def quickstart_with(*replacements: tuple[str, str]) -> str:
    """The quick-start text with each (old, new) replaced; each `old` must occur exactly once."""
    text = QUICKSTART_TEXT
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the quick-start"
        text = text.replace(old, new)
    return text


def check(text: str, file: str = "spec.yaml"):
    """load -> validate -> graph lint, the torch-free front half, on YAML text. Returns the Spec."""
    spec = validate(load_text(text, file))
    problems = Collector(spec.doc.where)
    spec.graph_nx = build_graph(spec, problems)
    problems.raise_if_any()
    return spec


def problems_of(text: str, file: str = "spec.yaml") -> list[str]:
    """The located problem lines `check` reports for `text` (fails the test if there are none)."""
    try:
        check(text, file)
    except SpecError as exc:
        return [str(p) for p in exc.problems]
    raise AssertionError("expected a SpecError, but the spec is valid")


def cli_env() -> dict:
    """The environment of a `python -m genspec` subprocess: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], cwd: Path | str = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genspec", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def cli_in_process(*args) -> tuple[int, str, str]:
    """`genspec ARGS` through genspec.cli.main in this process (spares torch's import): (status, stdout, stderr)."""
    from genspec import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def genspec_subprocess(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m genspec ARGS` as a user runs it, from the repository root."""
    return run_cli([str(a) for a in args], timeout=timeout)


# A small VAE on the 8x8 digits that trains in well under a second; tests append their own sections.
TINY_DIGITS_VAE = """\
genspec: 1
name: NAME
data: {dataset: digits, split: {train: 64, test: 32}}
latent:
  z: {shape: [2], prior: normal}
networks:
  enc:
    input: x
    layers: [flatten, "fc 16, relu", gaussian 2]
  dec:
    input: z
    layers: ["fc 16, relu", "fc 64, sigmoid", reshape 1 8 8]
graph:
  q: enc(x)
  z: rsample(q)
  x_rec: dec(z)
losses:
  rec: sqerr(x_rec, x)
  kl: kl(q, z)
  nelbo: rec + kl
objectives:
  vae: {networks: [enc, dec], minimize: nelbo, optimizer: adam(1e-3)}
train: {epochs: 1, batch_size: 32, seed: 0, device: cpu}
"""


def tiny_digits_vae(name: str, tail: str = "") -> str:
    """TINY_DIGITS_VAE named `name`, with `tail` (more top-level sections) appended."""
    return TINY_DIGITS_VAE.replace("name: NAME", f"name: {name}") + tail


def tiny_gan_doc(name: str, lr: float, phases: list, epochs: int = 1, **train) -> dict:
    """A two-network GAN on the digits as a spec mapping: routing and phase tests count its updates."""
    return {
        "genspec": 1, "name": name,
        "params": {"lr": lr},
        "data": {"dataset": "digits", "range": [-1, 1], "split": {"train": 160, "test": 32}},
        "latent": {"z": {"shape": [8]}},
        "networks": {
            "gen": {"input": "z", "layers": ["fc 32, relu", "fc 64, tanh", "reshape 1 8 8"]},
            "dis": {"input": "x", "layers": ["flatten", "fc 32, lrelu 0.2", "fc 1, sigmoid"]},
        },
        "graph": {"fake": "gen(sample(z))"},
        "losses": {"d_real": "bce(dis(x), 1)", "d_fake": "bce(dis(fake.detach()), 0)", "g_adv": "bce(dis(fake), 1)"},
        "objectives": {"dis": {"minimize": "d_real + d_fake", "optimizer": "adam(lr)"},
                       "gen": {"minimize": "g_adv", "optimizer": "adam(lr)"}},
        "train": {"epochs": epochs, "batch_size": 16, "seed": 0, "device": "cpu", "phases": phases, **train},
    }


# A classifier on the 8x8 digits with a feature tap: a feature extractor, or a run with no random draws.
TINY_DIGITS_CLASSIFIER = """\
genspec: 1
name: digits_classifier
data: {dataset: digits, labels: true, split: {train: 256, test: 64}}
networks:
  classifier:
    input: x
    layers: [flatten, "fc 32, relu  as features", "fc 10, log_softmax"]
graph:
  logp: classifier(x)
losses:
  nll: nll(logp, y)
objectives:
  classifier: {minimize: nll, optimizer: adam(1e-2)}
train: {epochs: 2, batch_size: 64, device: cpu}
evaluate: {losses: [nll], grids: {}, accuracy: logp}
"""


# The shipped BEGAN spec, shrunk to 8x8 digits: its losses, state, trace and collapse flag stay as written.
TINY_BEGAN = f"""\
genspec: 1
name: tiny_began
extends: {REPO / "specs" / "began.yaml"}
params: {{lambda_k: 0.05}}
data: {{dataset: digits, image_size: null, split: {{train: 64, test: 32}}}}
latent: {{z: {{shape: [4], prior: "uniform(-1, 1)"}}}}
networks:
  gen: {{input: z, layers: ["fc 4x4x8, lrelu 0.2", upsample 2, conv 1 3x3]}}
  dec: {{input: 4, layers: ["fc 4x4x8, lrelu 0.2", upsample 2, conv 1 3x3]}}
  enc: {{input: x, layers: ["conv 8 3x3 /2, lrelu 0.2", flatten, fc 4]}}
train: {{epochs: 2, batch_size: 16, device: cpu}}
evaluate: {{grids: [samples, reconstructions]}}
"""


# WGAN-GP on the digits: the penalty inside the stacked step, dropout in the critic, five critic
# steps per generator step as the coursework's WGAN-GP trains.
TINY_WGAN_GP = """\
genspec: 1
name: tiny_wgan_gp
params: {lr: 1.0e-3}
data: {dataset: digits, range: [-1, 1], split: {train: 160, test: 64}}
latent: {z: {shape: [4]}}
networks:
  gen: {input: z, layers: ["fc 32, relu", "fc 64, tanh", reshape 1 8 8]}
  dis: {input: x, layers: ["conv 4 3x3 /2, lrelu 0.2, dropout 0.2", flatten, "fc 16, lrelu 0.2", fc 1]}
graph:
  x_fake: gen(sample(z))
  d_real: dis(x)
  d_fake: dis(x_fake)
losses:
  penalty: gp(dis, x, x_fake)
  d_loss: mean(d_fake) - mean(d_real) + 10 * penalty
  g_loss: -mean(d_fake)
objectives:
  dis: {minimize: d_loss, optimizer: adam(lr)}
  gen: {minimize: g_loss, optimizer: adam(lr)}
train: {epochs: 2, batch_size: 32, device: cpu, phases: [{update: [dis], repeat: 5}, {update: [gen]}]}
evaluate: {losses: [penalty, d_loss], grids: {}}
"""


# A deterministic autoencoder on the digits (no draws in a step) with batch statistics in both
# networks: `bn` / `vbn` as a row's norm after a conv and an fc, and as a row of its own. The rows
# before a norm have no bias: its gradient is zero up to rounding, which Adam would amplify into
# steps of the learning rate in directions that float order decides.
NORMED_AUTOENCODER = """\
genspec: 1
name: normed_autoencoder
data: {dataset: digits, split: {train: 96, test: 40}}
latent:
  z: {shape: [3], prior: normal}
networks:
  enc:
    input: x
    layers: ["conv 4 3x3 /2 bias=false, NORM, relu", flatten, "fc 16 bias=false", NORM, relu, "fc 3, tanh"]
  dec:
    input: z
    layers: ["fc 16 bias=false, NORM, relu", "fc 64, sigmoid", reshape 1 8 8]
graph:
  x_rec: dec(enc(x))
losses:
  rec: sqerr(x_rec, x)
objectives:
  ae: {networks: [enc, dec], minimize: rec, optimizer: adam(1e-2)}
train: {epochs: 2, batch_size: 32, device: cpu}
evaluate: {losses: [rec], grids: {}}
"""


TINY_CONDITIONAL_GAN = """\
genspec: 1
name: tiny_cgan
data: {dataset: digits, labels: true, split: {train: 64, test: 32}}
latent:
  z: {shape: [4], prior: normal}
  c: {shape: [10], prior: categorical}
networks:
  gen:
    input: z
    condition: {label: c}
    layers: [concat label, "fc 16, vbn, relu", "fc 64, sigmoid", reshape 1 8 8]
  dis:
    input: x
    condition: {label: y}
    layers: [concat label, flatten, "fc 16, lrelu 0.2", "fc 1, sigmoid"]
graph:
  c_fake: sample(c)
  x_fake: gen(sample(z), c_fake)
losses:
  d_loss: bce(dis(x, onehot(y)), 1) + bce(dis(x_fake.detach(), c_fake), 0)
  g_loss: bce(dis(x_fake, c_fake), 1)
objectives:
  dis: {minimize: d_loss, optimizer: adam(1e-3)}
  gen: {minimize: g_loss, optimizer: adam(1e-3)}
train: {epochs: 1, batch_size: 32, device: cpu, phases: [{update: [dis]}, {update: [gen]}]}
evaluate: {losses: [d_loss, g_loss], grids: {}}
"""
