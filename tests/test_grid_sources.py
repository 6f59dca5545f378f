"""Which graph tensor each requested grid shows (evaluate.grid_sources)."""

import pytest

import genspec
from genspec.errors import RunError
from genspec.measure.evaluate import grid_sources


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
    spec = genspec.load("specs/mnist_gan.yaml", ["evaluate.grids=[samples, reconstructions]"])
    with pytest.raises(RunError, match="no graph tensor reconstructs x"):
        grid_sources(spec)


def test_an_explicit_mapping_names_the_tensor():
    spec = genspec.load("specs/quickstart.yaml", ["evaluate.grids={samples: x_gen}"])
    assert grid_sources(spec) == {"samples": ("tensor", "x_gen")}
