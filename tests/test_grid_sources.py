"""Which graph tensor each requested grid shows (evaluate.grid_sources, decided by genspec/graph/grids.py)."""

import pytest

import genspec
from genspec.errors import SpecError
from genspec.measure.evaluate import grid_sources
from spec_helpers import TINY_DIGITS_CLASSIFIER, check, cli_in_process, problems_of


def test_a_vae_shows_its_decoder_on_prior_draws_and_its_reconstruction():
    spec = genspec.load("specs/quickstart.yaml")
    assert grid_sources(spec) == {"samples": ("generator", "dec", "z", ()), "reconstructions": ("tensor", "x_rec"),
                                  "interpolations": ("generator", "dec", "z", ())}


def test_began_reconstructs_through_its_discriminator_autoencoder():
    spec = genspec.load("specs/began.yaml")
    assert grid_sources(spec) == {"samples": ("generator", "gen", "z", ()), "reconstructions": ("tensor", "rec_real"),
                                  "interpolations": ("generator", "gen", "z", ())}


def test_a_conditional_generator_draws_its_labels_from_their_latent():
    spec = genspec.load("specs/cgan.yaml")
    assert grid_sources(spec)["samples"] == ("generator", "gen", "z", ("c",))


def test_a_gan_has_no_reconstruction_even_though_training_links_its_generator_to_x():
    # gen's objective reads dis(x): through the update edges every tensor "depends" on x; data edges do not
    with pytest.raises(SpecError, match=r"evaluate\.grids\[1\]: no graph tensor reconstructs x"):
        genspec.load("specs/mnist_gan.yaml", ["evaluate.grids=[samples, reconstructions]"])


def test_an_explicit_mapping_names_the_tensor():
    spec = genspec.load("specs/quickstart.yaml", ["evaluate.grids={samples: x_gen}"])
    assert grid_sources(spec) == {"samples": ("tensor", "x_gen")}


# ---------------------------------------------------------------- grids with nothing to show: refused by validate

CLASSIFIER_WITH_SAMPLES = TINY_DIGITS_CLASSIFIER.replace("grids: {}", "grids: [samples]")
# a decoder conditioned on the data's labels: draws of z alone cannot feed it
LABELLED_DECODER = """\
genspec: 1
name: cvae
data: {dataset: digits, labels: true, split: {train: 256, test: 64}}
latent:
  z: {shape: [4], prior: normal}
networks:
  enc: {input: x, layers: [flatten, "fc 32, relu", gaussian 4]}
  dec:
    input: z
    condition: {label: y}
    layers: [concat label, "fc 32, relu", "fc 64, sigmoid", reshape 1 8 8]
graph:
  q: enc(x)
  z: rsample(q)
  x_rec: dec(z, onehot(y))
  x_gen: dec(sample(z), onehot(y))
losses:
  elbo: sqerr(x_rec, x) + kl(q, z)
objectives:
  vae: {networks: [enc, dec], minimize: elbo, optimizer: adam(1e-3)}
evaluate: {grids: [samples, reconstructions, interpolations]}
"""


def test_samples_of_a_spec_without_a_generator_are_refused_at_their_grid():
    assert CLASSIFIER_WITH_SAMPLES.count("grids: [samples]") == 1
    lines = CLASSIFIER_WITH_SAMPLES.splitlines()
    n = next(i for i, line in enumerate(lines, 1) if line.startswith("evaluate:"))
    assert problems_of(CLASSIFIER_WITH_SAMPLES, "clf.yaml") == [
        f"clf.yaml:{n}:{lines[n - 1].index('samples') + 1}: evaluate.grids[0]: no network turns a latent's draws into an image of the data's shape "
        "1x8x8, so there are no samples to draw; leave samples out of evaluate.grids, or name a graph tensor of images: "
        "grids: {samples: TENSOR}"]


def test_a_decoder_conditioned_on_the_labels_y_draws_no_samples_and_the_message_says_what_to_write():
    n, line = len(LABELLED_DECODER.splitlines()), LABELLED_DECODER.splitlines()[-1]  # the evaluate line
    why = ("network 'dec' makes images from a latent, but its condition 'label' is the data's labels y, which a draw of "
           "the prior does not have, so there are no {} to draw; ")
    categorical = "condition 'label' on a categorical latent (condition: {label: c}) as a CGAN does"
    assert problems_of(LABELLED_DECODER, "cvae.yaml") == [
        f"cvae.yaml:{n}:{line.index('samples') + 1}: evaluate.grids[0]: " + why.format("samples")
        + "name the graph tensor that shows them, e.g. grids: {samples: x_gen, reconstructions: x_rec} (x_gen is "
        "dec(sample(z), onehot(y)), on the test set's labels), or " + categorical,
        f"cvae.yaml:{n}:{line.index('interpolations') + 1}: evaluate.grids[2]: " + why.format("interpolations")
        + "leave interpolations out, or " + categorical]
    # what the message suggests validates, and shows those tensors
    fixed = check(LABELLED_DECODER.replace("[samples, reconstructions, interpolations]", "{samples: x_gen, reconstructions: x_rec}"))
    assert grid_sources(fixed) == {"samples": ("tensor", "x_gen"), "reconstructions": ("tensor", "x_rec")}


def test_a_named_grid_tensor_must_hold_images():
    text = TINY_DIGITS_CLASSIFIER.replace("grids: {}", "grids: {samples: logp}")
    (problem,) = problems_of(text, "clf.yaml")
    assert problem.endswith("evaluate.grids.samples: 'logp' is a tensor of shape 10; a samples grid shows images (a "
                            "tensor of 1 or 3 channels by height by width)")


def test_both_are_spec_errors_of_genspec_validate(tmp_path):
    for name, text in (("clf", CLASSIFIER_WITH_SAMPLES), ("cvae", LABELLED_DECODER)):
        (tmp_path / f"{name}.yaml").write_text(text)
        rc, out, err = cli_in_process("validate", tmp_path / f"{name}.yaml")
        assert rc == 2 and out == "" and f"{name}.yaml:" in err and "evaluate.grids[0]: " in err, err
