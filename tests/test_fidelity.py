"""Sample-quality metrics through torch-fidelity (genspec/measure/fidelity.py).

A tiny classifier trained for one epoch on the 8x8 digits is the registered feature extractor;
genspec's numbers are checked against torch-fidelity's own feature-level functions on the same
images. The Inception path runs on a locally made, randomly initialised weights file; nothing
is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
from pathlib import Path

import pytest
import torch

import genspec
from genspec.measure import fidelity as gf
from genspec.errors import RunError
from spec_helpers import cli_in_process as main

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")

CLASSIFIER_SPEC = """\
genspec: 1
name: tiny_classifier
source:
  reported: {test_accuracy: 0.5, is: 3.0, fid: 10.0}
data:
  dataset: digits
  labels: true
  split: {train: 300, test: 100}
networks:
  clf:
    input: x
    layers:
      - flatten
      - fc 32, relu  as features
      - fc 10, log_softmax
graph:
  logp: clf(x)
losses:
  nll: nll(logp, y)
objectives:
  clf: {minimize: nll, optimizer: adam(1e-2)}
train:
  epochs: 1
  batch_size: 32
  device: cpu
evaluate:
  grids: {}
  accuracy: logp
  real:
    is: {splits: 2}
"""

VAE_SPEC = """\
genspec: 1
name: tiny_vae
params: {{beta: 1.0, sigma2: 0.05, lr: 1e-3}}
data:
  dataset: digits
  split: {{train: 128, test: 96}}
latent:
  z: {{shape: [8], prior: normal}}
networks:
  enc:
    input: x
    layers: [flatten, "fc 64, relu", gaussian 8]
  dec:
    input: z
    layers: ["fc 64, sigmoid", reshape 1 8 8]
graph:
  q: enc(x)
  z: rsample(q)
  x_rec: dec(z)
losses:
  rec: sqerr(x_rec, x) / (2 * sigma2)
  kl: kl(q, z)
  elbo: rec + beta * kl
objectives:
  vae: {{networks: [enc, dec], minimize: elbo, optimizer: adam(lr)}}
train:
  epochs: 1
  batch_size: 32
  device: cpu
evaluate:
  grids: []
{evaluate}
"""

FIDELITY_EVALUATE = """\
  fid: {{samples: 64}}
  kid: {{samples: 64, subset_size: 16}}
  is: {{samples: 64, splits: 2}}
  extractor: {{classifier: {classifier}}}
  reference: {{split: test, size: 64}}
"""




def vae_spec(folder: Path, evaluate: str, name: str = "vae.yaml") -> Path:
    path = folder / name
    path.write_text(VAE_SPEC.format(evaluate=evaluate))
    return path


def digits(first: int, n: int) -> torch.Tensor:
    """Real 8x8 digits in [0, 1], (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[first:first + n] / 16.0, dtype=torch.float32).unsqueeze(1)


def fake_generator(n: int) -> torch.Tensor:
    """Deterministic 'samples': real digits, blurred by noise (so they differ from the reference)."""
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    return (0.6 * digits(1000, n) + 0.4 * noise).clamp(0, 1)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity")
    spec = folder / "classifier.yaml"
    spec.write_text(CLASSIFIER_SPEC)
    out = folder / "classifier"
    rc, stdout, stderr = main("run", spec, "--out", out, "--no-progress")
    assert rc == 0, stderr
    return out


@pytest.fixture(scope="module")
def vae_run(classifier_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    spec = vae_spec(folder, FIDELITY_EVALUATE.format(classifier=classifier_run))
    out = folder / "vae"
    rc, stdout, stderr = main("run", spec, "--out", out, "--no-progress")
    assert rc == 0, stderr
    return out


# ---------------------------------------------------------------- the classifier run

def test_classifier_run_scores_accuracy_and_real_is(classifier_run):
    metrics = json.loads((classifier_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    real = metrics["real"]
    assert 1.0 <= real["inception_score_mean"] <= 10.0  # IS of 10 classes lies in [1, 10]
    assert real["inception_score_std"] >= 0
    assert real["protocol"]["weights_sha256"] == sha256_of(classifier_run / "checkpoint.pt")
    assert real["protocol"]["samples"] == {"is": 100}  # the whole test split
    assert real["protocol"]["feature_row"] == 1  # the row tapped `as features`


def test_the_real_set_score_keeps_the_checkpoint_the_training_loop_wrote(tmp_path):
    """The classifier's extractor is read from the finished run's checkpoint. The loop has written
    it after the last epoch, under --nproc with every rank's random streams, which a resume with
    as many processes replays: scoring the real test set must not overwrite it without them."""
    import yaml

    from genspec.measure.evaluate import _real_metrics
    from genspec.train.folder import RESOLVED
    from genspec.train.loop import prepare
    from genspec.train.checkpoint import save_checkpoint

    (tmp_path / "clf.yaml").write_text(CLASSIFIER_SPEC)
    spec = genspec.load(tmp_path / "clf.yaml")
    (tmp_path / RESOLVED).write_text(yaml.safe_dump(spec.raw, sort_keys=False))  # a run folder, as train.run leaves it
    splits, model = prepare(spec)
    streams = [{"cpu": torch.get_rng_state()}, {"cpu": torch.get_rng_state()}]
    save_checkpoint(model, tmp_path, spec.train["epochs"], streams)
    before = sha256_of(tmp_path / "checkpoint.pt")
    real = _real_metrics(spec, model, splits, tmp_path)
    assert sha256_of(tmp_path / "checkpoint.pt") == before == real["protocol"]["weights_sha256"]
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["rank_rng"]) == 2


def test_report_compares_paper_and_run(classifier_run):
    metrics = json.loads((classifier_run / "metrics.json").read_text())
    report = (classifier_run / "report.md").read_text()
    assert "## Paper and run" in report
    assert "| metric | paper | run | run - paper |" in report
    acc = metrics["test_accuracy"]
    assert f"| test_accuracy | 0.5 | {acc:.4g} | {acc - 0.5:+.4g} |" in report
    # `is` is an alias of inception_score_mean: here the real-data IS of the classifier run
    score = metrics["real"]["inception_score_mean"]
    assert f"| is | 3 | {score:.4g} | {score - 3.0:+.4g} |" in report
    assert "| fid | 10 | not measured |  |" in report
    assert "## Real test set, in this run's feature space" in report


# ---------------------------------------------------------------- a VAE measured by it

def test_vae_run_records_fidelity_and_protocol(vae_run, classifier_run):
    metrics = json.loads((vae_run / "metrics.json").read_text())
    fidelity = metrics["fidelity"]
    for key in ("frechet_inception_distance", "kernel_inception_distance_mean", "inception_score_mean"):
        assert key in fidelity and math.isfinite(fidelity[key]), key
    assert fidelity["frechet_inception_distance"] >= 0
    assert 1.0 <= fidelity["inception_score_mean"] <= 10.0
    protocol = metrics["protocol"]
    assert protocol["weights_sha256"] == sha256_of(classifier_run / "checkpoint.pt")
    assert protocol["samples"] == {"is": 64, "fid": 64, "kid": 64}
    assert protocol["reference_split"] == "test" and protocol["reference_size"] == 64
    assert str(classifier_run) in protocol["extractor"]
    assert protocol["reference_features"] in ("extracted", "cached")  # cached when an earlier run used this reference
    assert metrics["fidelity_notes"] == []
    report = (vae_run / "report.md").read_text()
    assert "## Sample quality" in report
    assert f"| frechet_inception_distance | {fidelity['frechet_inception_distance']:.5g} |" in report
    assert f"weights_sha256 = {protocol['weights_sha256']}" in report


def _own_features(name: str, images: torch.Tensor) -> dict:
    """Features of uint8 images through the registered extractor, outside calculate_metrics."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    extractor = FEATURE_EXTRACTORS_REGISTRY[name](name, ["features", "logits"])
    extractor.eval()
    with torch.no_grad():
        features, logits = extractor(images)
    return {"features": features, "logits": logits}


def test_metrics_equal_torch_fidelity_feature_level(classifier_run, tmp_path):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    spec = genspec.load(vae_spec(tmp_path, FIDELITY_EVALUATE.format(classifier=classifier_run)))
    reference = digits(0, 64)
    result = gf.sample_metrics(spec, None, fake_generator, reference, CPU)
    ours = result["metrics"]
    assert result["notes"] == []

    name, protocol = gf.classifier_extractor(str(classifier_run))
    assert protocol["weights_sha256"] == result["protocol"]["weights_sha256"]
    fake = _own_features(name, gf.to_uint8(fake_generator(64), [0, 1]))
    real = _own_features(name, gf.to_uint8(reference, [0, 1]))
    assert fake["features"].shape == (64, 32) and fake["logits"].shape == (64, 10)

    fid = fid_statistics_to_metric(fid_features_to_statistics(fake["features"]),
                                   fid_features_to_statistics(real["features"]), False)
    isc = isc_features_to_metric(fake["logits"], splits=2, shuffle=True, rng_seed=2020)
    kid = kid_features_to_metric(fake["features"], real["features"], kid_subset_size=16, verbose=False)
    expected = {**fid, **isc, **kid}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    assert ours["frechet_inception_distance"] > 1e-3  # noisy digits are not the reference: a real distance
    # and the same function on the reference itself gives (nearly) zero FID
    same = fid_statistics_to_metric(fid_features_to_statistics(real["features"]),
                                    fid_features_to_statistics(real["features"]), False)
    assert same["frechet_inception_distance"] == pytest.approx(0, abs=1e-6)


def test_calculate_gives_what_calculate_metrics_gives(classifier_run, monkeypatch, tmp_path):
    """genspec's path (torch-fidelity's metric functions, the reference's features cached) and
    torch_fidelity.calculate_metrics give the same numbers for every metric."""
    import torch_fidelity

    monkeypatch.setenv("GENSPEC_CACHE", str(tmp_path / "cache"))
    name, protocol = gf.classifier_extractor(str(classifier_run))
    fake, real = gf.to_uint8(fake_generator(64), [0, 1]), gf.to_uint8(digits(0, 64), [0, 1])
    options = {"isc": True, "fid": True, "kid": True, "prc": True, "isc_splits": 2, "kid_subset_size": 16}
    common = {"cuda": False, "batch_size": 32, "verbose": False, "save_cpu_ram": True, "samples_shuffle": True}
    expected = torch_fidelity.calculate_metrics(input1=gf.ImageSet(fake), input2=gf.ImageSet(real), feature_extractor=name,
                                                cache=False, **options, **common)
    first, how = gf.calculate(fake, real, name, protocol["weights_sha256"], options, common)
    assert how == "extracted" and len(list((tmp_path / "cache" / "fidelity").glob("reference-*.pt"))) == 1
    second, how = gf.calculate(fake, real, name, protocol["weights_sha256"], options, common)
    assert how == "cached"
    assert set(first) == set(expected) and "precision" in first and "inception_score_mean" in first
    for key, value in expected.items():
        assert first[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
        assert second[key] == first[key], key  # the cached features are the extracted ones, bit for bit


def test_reference_features_are_cached_by_content_and_extractor(classifier_run, monkeypatch, tmp_path):
    import torch_fidelity.utils

    monkeypatch.setenv("GENSPEC_CACHE", str(tmp_path / "cache"))
    extracted = []
    original = torch_fidelity.utils.extract_featuresdict_from_input_id
    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id",
                        lambda i, *a, **k: extracted.append(i) or original(i, *a, **k))
    name, protocol = gf.classifier_extractor(str(classifier_run))
    fake = gf.to_uint8(fake_generator(32), [0, 1])
    options, common = {"fid": True}, {"cuda": False, "batch_size": 32, "verbose": False, "save_cpu_ram": True}

    def fid(real, weights=protocol["weights_sha256"]):
        extracted.clear()
        metrics, how = gf.calculate(fake, gf.to_uint8(real, [0, 1]), name, weights, options, common)
        return metrics["frechet_inception_distance"], how, list(extracted)

    a = fid(digits(0, 40))
    assert a[1:] == ("extracted", [1, 2])
    assert fid(digits(0, 40))[1:] == ("cached", [1])  # only the samples' features are extracted again
    assert fid(digits(0, 40))[0] == a[0]
    assert fid(digits(1, 40))[1] == "extracted"  # other images
    assert fid(digits(0, 40), weights="other")[1] == "extracted"  # another extractor's weights
    entries = sorted((tmp_path / "cache" / "fidelity").glob("reference-*.pt"))
    assert len(entries) == 3 and not list((tmp_path / "cache" / "fidelity").glob("*.tmp"))
    for entry in entries:
        entry.write_bytes(b"not a tensor file")  # damaged: extracted afresh and replaced
    assert fid(digits(0, 40))[1] == "extracted" and fid(digits(0, 40))[:2] == (a[0], "cached")


def test_small_reference_is_noted(classifier_run, tmp_path):
    spec = genspec.load(vae_spec(tmp_path, FIDELITY_EVALUATE.format(classifier=classifier_run)))
    result = gf.sample_metrics(spec, None, fake_generator, digits(0, 32), CPU)
    assert result["protocol"]["reference_size"] == 32
    assert any("64 samples asked" in n and "the reference has only 32 images" in n for n in result["notes"]), \
        result["notes"]
    assert math.isfinite(result["metrics"]["frechet_inception_distance"])


def test_kid_subset_is_capped_with_a_note(classifier_run, tmp_path):
    evaluate = f"  kid: {{samples: 24, subset_size: 50}}\n  extractor: {{classifier: {classifier_run}}}\n"
    spec = genspec.load(vae_spec(tmp_path, evaluate))
    result = gf.sample_metrics(spec, None, fake_generator, digits(0, 40), CPU)
    assert "kid: subset size 24 (asked 50) for lack of samples" in result["notes"]
    assert set(result["metrics"]) == {"kernel_inception_distance_mean", "kernel_inception_distance_std"}


def test_protocol_records_the_default_sample_count(classifier_run, tmp_path):
    evaluate = f"  fid: {{}}\n  extractor: {{classifier: {classifier_run}}}\n"
    spec = genspec.load(vae_spec(tmp_path, evaluate))
    asked = []

    def generate(n):
        asked.append(n)
        return digits(0, n)

    result = gf.sample_metrics(spec, None, generate, digits(0, 100), CPU)
    assert asked == [1000]
    assert result["protocol"]["samples"] == {"fid": 1000}


# ---------------------------------------------------------------- adapt_images

def test_adapt_images_grey_to_rgb_and_range():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    out = gf.adapt_images(x, (3, 2, 2), [0, 1])
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    signed = gf.adapt_images(x, (3, 2, 2), [-1, 1])
    assert torch.allclose(signed[0, 1], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))


def test_adapt_images_rgb_to_grey_and_resize():
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    x[:, 0] = 255  # pure red: grey is the channel mean, 1/3
    out = gf.adapt_images(x, (1, 8, 8), [0, 1])
    assert out.shape == (2, 1, 8, 8)
    assert torch.allclose(out, torch.full((2, 1, 8, 8), 1 / 3), atol=1e-6)
    # a left/right split image keeps its halves when resized
    y = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    y[..., 8:] = 255
    small = gf.adapt_images(y, (1, 4, 4), [-1, 1])
    assert small.shape == (1, 1, 4, 4)
    assert torch.allclose(small[..., 0], torch.full((1, 1, 4), -1.0), atol=1e-6)
    assert torch.allclose(small[..., 3], torch.full((1, 1, 4), 1.0), atol=1e-6)
    # unchanged shape: only the value mapping
    same = gf.adapt_images(y, (1, 16, 16), [0, 1])
    assert torch.equal(same, y.float() / 255)


# ---------------------------------------------------------------- Inception weights

@pytest.fixture()
def no_network(monkeypatch):
    """Any download attempt fails the test loudly (and never reaches the network)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(*args, **kwargs):
        raise AssertionError("attempted a network download")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("GENSPEC_INCEPTION_WEIGHTS", raising=False)
    return hub


INCEPTION_EVALUATE = "  is: {samples: 8, splits: 2}\n  fid: {samples: 8}\n  kid: {samples: 8, subset_size: 4}\n"


def test_missing_inception_weights_is_a_clear_error(tmp_path, empty_hub, no_network):
    spec = genspec.load(vae_spec(tmp_path, INCEPTION_EVALUATE))
    with pytest.raises(RunError) as info:
        gf.sample_metrics(spec, None, fake_generator, digits(0, 8), CPU)
    message = str(info.value)
    assert gf.INCEPTION_FILE == "weights-inception-2015-12-05-6726825d.pth"
    assert str(empty_hub / "checkpoints" / gf.INCEPTION_FILE) in message
    assert "evaluate.weights" in message and "GENSPEC_INCEPTION_WEIGHTS" in message
    assert not list(empty_hub.rglob("*"))  # nothing fetched or created


def test_missing_inception_weights_through_the_cli(tmp_path, empty_hub, no_network):
    spec = vae_spec(tmp_path, INCEPTION_EVALUATE)
    rc, stdout, stderr = main("run", spec, "--out", tmp_path / "run", "--no-progress", "--set", "train.max_steps=1")
    assert rc == 1
    assert stderr.splitlines()[-1].startswith("genspec: Inception weights not found")
    assert gf.INCEPTION_FILE in stderr
    assert "epoch 1/1" not in stderr  # refused before training, not after it
    assert not (tmp_path / "run").exists()


def test_classifier_extractor_that_is_not_a_run_is_refused_before_training(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    spec = vae_spec(tmp_path, FIDELITY_EVALUATE.format(classifier=tmp_path / "not_a_run"))
    rc, stdout, stderr = main("run", spec, "--out", tmp_path / "run", "--no-progress")
    assert rc == 1
    assert "evaluate.extractor" in stderr and "not_a_run" in stderr and "checkpoint.pt" in stderr
    assert "Traceback" not in stderr and "epoch 1/1" not in stderr
    assert not (tmp_path / "run").exists()


def test_inception_weights_are_found_in_order(tmp_path, empty_hub, monkeypatch):
    cached = empty_hub / "checkpoints" / gf.INCEPTION_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert gf.inception_weights({}) == cached
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv("GENSPEC_INCEPTION_WEIGHTS", str(env_file))
    assert gf.inception_weights({}) == env_file
    spec_file = tmp_path / "spec.pth"
    spec_file.write_bytes(b"x")
    assert gf.inception_weights({"weights": str(spec_file)}) == spec_file


@pytest.mark.parametrize("where", ["evaluate.weights", "GENSPEC_INCEPTION_WEIGHTS"])
def test_named_inception_weights_that_are_not_a_file_are_an_error(tmp_path, empty_hub, monkeypatch, where):
    # a misspelt path is reported, not silently replaced by the hub's copy
    cached = empty_hub / "checkpoints" / gf.INCEPTION_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    missing = tmp_path / "no_such.pth"
    evaluate = {}
    if where == "evaluate.weights":
        evaluate["weights"] = str(missing)
    else:
        monkeypatch.setenv("GENSPEC_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(RunError) as exc:
        gf.inception_weights(evaluate)
    assert str(exc.value) == f"{where} names {missing}, which is not a file"


TRIPPED = []


def _tripwire():
    TRIPPED.append(True)
    return "ran"


class Tripwire:
    """Unpickling this runs code: what torch-fidelity's weights_only=False load would do."""

    def __reduce__(self):
        return (_tripwire, ())


def test_weights_with_pickled_objects_are_refused(tmp_path, no_network):
    weights = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Tripwire()}, weights)
    evaluate = INCEPTION_EVALUATE + f"  weights: {weights}\n"
    spec = genspec.load(vae_spec(tmp_path, evaluate))
    TRIPPED.clear()
    with pytest.raises(RunError, match="not a plain tensor file"):
        gf.sample_metrics(spec, None, fake_generator, digits(0, 8), CPU)
    assert TRIPPED == []  # never unpickled with code execution
    assert str(weights) in str(pytest.raises(RunError, gf._safe_check, weights).value)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file of the right structure: torch-fidelity's Inception, randomly initialised, built offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # He initialisation keeps the signal alive through the 40-odd layers (torch's default fades it to constants)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / gf.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_metrics_from_a_local_weights_file(tmp_path, random_inception_weights, empty_hub, no_network):
    evaluate = INCEPTION_EVALUATE + f"  weights: {random_inception_weights}\n"
    spec = genspec.load(vae_spec(tmp_path, evaluate))
    result = gf.sample_metrics(spec, None, fake_generator, digits(0, 8), CPU)
    metrics = result["metrics"]
    assert {"inception_score_mean", "frechet_inception_distance", "kernel_inception_distance_mean"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["inception_score_mean"] >= 1.0
    assert metrics["frechet_inception_distance"] > 0
    protocol = result["protocol"]
    assert protocol["extractor"].startswith("inception-v3-compat")
    assert protocol["weights_sha256"] == sha256_of(random_inception_weights)
    assert protocol["samples"] == {"is": 8, "fid": 8, "kid": 8}
    assert "kid: subset size" not in " ".join(result["notes"])


def test_inception_score_from_a_local_weights_file_via_env(tmp_path, random_inception_weights, empty_hub,
                                                           no_network, monkeypatch):
    """The quick Inception check: IS of 4 grey 8x8 images (expanded to RGB), weights from the environment."""
    monkeypatch.setenv("GENSPEC_INCEPTION_WEIGHTS", str(random_inception_weights))
    spec = genspec.load(vae_spec(tmp_path, "  is: {samples: 4, splits: 2}\n"))
    result = gf.sample_metrics(spec, None, fake_generator, digits(0, 4), CPU)
    assert set(result["metrics"]) == {"inception_score_mean", "inception_score_std"}
    assert result["metrics"]["inception_score_mean"] >= 1.0
    assert result["protocol"]["weights_sha256"] == sha256_of(random_inception_weights)
    assert result["notes"] == []


def test_the_real_score_can_read_the_training_split(tmp_path):
    # the coursework's IS of "the real MNIST dataset" uses N = 60,000: the training set
    spec = tmp_path / "classifier.yaml"
    spec.write_text(CLASSIFIER_SPEC)
    out = tmp_path / "run"
    rc, _, stderr = main("run", spec, "--out", out, "--no-progress", "--set", "evaluate.real.split=train")
    assert rc == 0, stderr
    real = json.loads((out / "metrics.json").read_text())["real"]
    assert real["protocol"]["samples"] == {"is": 300} and real["protocol"]["split"] == "train"
    assert "## Real train set, in this run's feature space" in (out / "report.md").read_text()


def test_a_classifier_run_is_found_in_the_specs_project_from_any_folder(tmp_path, monkeypatch):
    """`extractor: {classifier: reports/clf}` names a folder of the spec's project: a run started
    from another folder finds it there; one that exists from here, or nowhere, is kept as written."""
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "reports" / "clf").mkdir(parents=True)
    spec_file = vae_spec(project / "specs", FIDELITY_EVALUATE.format(classifier="reports/clf"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = genspec.load(spec_file)
    assert spec.evaluate["extractor"]["classifier"] == str((project / "reports" / "clf").resolve())

    missing = vae_spec(project / "specs", FIDELITY_EVALUATE.format(classifier="reports/none"), "missing.yaml")
    assert genspec.load(missing).evaluate["extractor"]["classifier"] == "reports/none"

    (elsewhere / "reports" / "clf").mkdir(parents=True)  # found from here: as written
    assert genspec.load(spec_file).evaluate["extractor"]["classifier"] == "reports/clf"
