"""Sample-quality metrics (IS, FID, KID, precision/recall) through torch-fidelity.

Never re-implemented: features come from a registered torch-fidelity extractor, either the
standard Inception-v3 (weights from a local file only) or the classifier of a finished genspec
run (e.g. specs/mnist_classifier.yaml), on the run's device, and the metrics from
torch-fidelity's own functions, in the order `calculate_metrics` calls them. One step is ours:
the reference images' features are kept in a cache (GENSPEC_CACHE, else ~/.cache/genspec), keyed
by the images' bytes, the extractor and its weights, so the runs of a study that share a
reference set extract it once. The measurement protocol (sample counts, reference split and
size, resize, extractor and the sha256 of its weights) is returned with the numbers, because FID
moves with every one of them.

torch-fidelity is imported only here, and only when a spec asks for these metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch.nn import functional as F

from genspec.errors import RunError, relayed

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
METRIC_FLAGS = {"is": "isc", "fid": "fid", "kid": "kid", "prc": "prc"}
DEFAULT_SAMPLES = 1000
_REGISTERED: dict[str, str] = {}


def _torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RunError(f"torch-fidelity is needed for sample metrics: pip install torch-fidelity ({exc})") from None
    return torch_fidelity


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageSet(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as torch-fidelity reads them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(x: torch.Tensor, value_range) -> torch.Tensor:
    if list(value_range) == [-1, 1]:
        x = (x + 1) / 2
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- extractors

def inception_weights(evaluate: dict) -> Path:
    """The local Inception file: evaluate.weights, else $GENSPEC_INCEPTION_WEIGHTS, else torch's hub cache."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    for named, where in ((evaluate.get("weights"), "evaluate.weights"), (os.environ.get("GENSPEC_INCEPTION_WEIGHTS"), "GENSPEC_INCEPTION_WEIGHTS")):
        if named and not Path(named).is_file():
            raise RunError(f"{where} names {named}, which is not a file")
    for candidate in (evaluate.get("weights"), os.environ.get("GENSPEC_INCEPTION_WEIGHTS"), hub):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise RunError(
        f"Inception weights not found, and genspec never downloads them. Place {INCEPTION_FILE} (torch-fidelity's "
        f"release v0.2.0) at {hub}, or point evaluate.weights or GENSPEC_INCEPTION_WEIGHTS at it; or use a "
        "genspec-trained classifier: evaluate.extractor: {classifier: reports/mnist_classifier}")


def _safe_check(path: Path) -> None:
    """torch-fidelity loads the file with weights_only=False: make sure it is only tensors first."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means we will not hand it on
        raise RunError(f"{path} is not a plain tensor file (refused to load it): {relayed(exc)}") from None


def load_classifier(run_dir: str, network: str | None = None, device="cpu"):
    """A finished classifier run and the name of its classifier network: the one named, else the
    first with a flat output (its class scores)."""
    from genspec.train.finished import load_run

    run = load_run(run_dir, device)
    names = [network] if network else [n for n, net in run.spec.networks.items() if len(net.info.output) == 1]
    if not names or names[0] not in run.networks:
        raise RunError(f"{run_dir}: no classifier network (one with a flat output) in this run")
    return run, names[0]


def classifier_extractor(run_dir: str, network: str | None = None):
    """Register the classifier of a finished run with torch-fidelity; returns (name, protocol)."""
    from genspec.train.folder import CHECKPOINT

    tf = _torch_fidelity()
    run, network = load_classifier(run_dir, network)
    names = [network]
    spec_net = run.spec.networks[network]
    module = run.networks[network]
    digest = sha256(Path(run_dir) / CHECKPOINT)
    name = f"genspec-classifier-{digest[:12]}"
    feature_row = spec_net.info.taps.get("features", _penultimate_row(spec_net))
    input_shape, value_range = tuple(spec_net.input), run.spec.data.get("range", [0, 1])

    class ClassifierFeatures(tf.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = module

        @staticmethod
        def get_provided_features_list():
            return ("logits", "features")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "features")

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros((1, *input_shape), dtype=torch.uint8)

        def forward(self, x):
            x = adapt_images(x, input_shape, value_range)
            outputs = {}
            h = x
            kept: dict = {}  # the outputs that skip rows read
            for i in range(len(self.net.rows)):
                h = self.net.rows.step(i, h, kept)
                if i == feature_row:
                    outputs["features"] = self.net.rows.output_of(i, h).flatten(1).float()
            # the classifier ends in log-softmax (or logits): both give softmax(logits) as torch-fidelity's IS needs
            outputs["logits"] = h.float()
            return tuple(outputs[f] for f in self.features_list)

    if name not in _REGISTERED:
        tf.register_feature_extractor(name, ClassifierFeatures)
        _REGISTERED[name] = run_dir
    protocol = {"extractor": f"network {names[0]} of the classifier run {run_dir}", "weights_sha256": digest,
                "feature_row": feature_row, "resize": f"bilinear to {input_shape[1]}x{input_shape[2]} where sizes differ"}
    return name, protocol


def _penultimate_row(net) -> int:
    with_params = [r.index for r in net.info.rows if r.params]
    return max(0, with_params[-1] - 1) if with_params else len(net.info.rows) - 2


def adapt_images(x: torch.Tensor, input_shape: tuple, value_range) -> torch.Tensor:
    """uint8 images -> the classifier's channels, size and value range."""
    x = x.float() / 255.0
    channels, height, width = input_shape
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1 if list(value_range) == [-1, 1] else x


def choose_extractor(evaluate: dict):
    """`inception`, or a classifier mapping; with inception_if_available, Inception when its weights are on disk."""
    extractor = evaluate.get("extractor", "inception")
    if isinstance(extractor, dict) and extractor.get("inception_if_available"):
        try:
            inception_weights(evaluate)
            return "inception"
        except RunError:
            return extractor
    return extractor


def preflight(evaluate: dict) -> None:
    """Fail before training, not after it, when the feature extractor is missing."""
    if not requested(evaluate):
        return
    extractor = choose_extractor(evaluate)
    if extractor == "inception":
        _safe_check(inception_weights(evaluate))
    elif not (Path(extractor["classifier"]) / "checkpoint.pt").is_file():
        raise RunError(f"evaluate.extractor: {extractor['classifier']} holds no finished classifier run (no checkpoint.pt); "
                       "train one first, e.g. genspec run specs/mnist_classifier.yaml")


# ---------------------------------------------------------------- the metrics

def requested(evaluate: dict) -> dict:
    return {m: dict(evaluate[m]) for m in METRIC_FLAGS if m in evaluate}


def sample_metrics(spec, model, generate, reference: torch.Tensor, device, progress: bool = False) -> dict:
    """IS / FID / KID / PRC of `generate(n)` images against `reference` images (spec range).

    Returns {"metrics": {torch-fidelity names: value}, "protocol": {...}, "notes": [...]}.
    """
    _torch_fidelity()  # a clear install hint if it is missing
    evaluate = spec.evaluate
    asked = requested(evaluate)
    extractor = choose_extractor(evaluate)
    value_range = spec.data.get("range", [0, 1])
    kwargs = {}
    if extractor == "inception":
        weights = inception_weights(evaluate)
        _safe_check(weights)
        name = "inception-v3-compat"
        kwargs["feature_extractor_weights_path"] = str(weights)
        protocol = {"extractor": "inception-v3-compat (torch-fidelity)", "weights_sha256": sha256(weights),
                    "resize": "torch-fidelity's TF1-compatible bilinear to 299x299"}
    else:
        name, protocol = classifier_extractor(extractor["classifier"], extractor.get("network"))
        pad = spec.data.get("pad", 0)
        if pad:  # the classifier saw unpadded images: undo the spec's padding rather than shrink the digit
            generate_padded, generate = generate, lambda n: generate_padded(n)[..., pad:-pad, pad:-pad]
            reference = reference[..., pad:-pad, pad:-pad]
            protocol["crop"] = f"{pad} pixels of padding removed before the classifier"
    ref_info = evaluate.get("reference", {})
    protocol.update({"reference_split": ref_info.get("split", "test"), "reference_size": len(reference),
                     "samples": {m: a.get("samples", DEFAULT_SAMPLES) for m, a in asked.items()}})
    notes, results = [], {}
    # one torch-fidelity call per distinct sample count, as each metric may ask for its own
    for count in sorted({a.get("samples", DEFAULT_SAMPLES) for a in asked.values()}):
        group = [m for m, a in asked.items() if a.get("samples", DEFAULT_SAMPLES) == count]
        fake = to_uint8(generate(count).cpu(), value_range)
        if extractor == "inception" and fake.shape[1] == 1:
            fake = fake.expand(-1, 3, -1, -1).contiguous()
        real = to_uint8(reference.cpu(), value_range)
        if extractor == "inception" and real.shape[1] == 1:
            real = real.expand(-1, 3, -1, -1).contiguous()
        binary = any(m in ("fid", "kid", "prc") for m in group)
        if binary and len(real) < count:
            notes.append(f"{', '.join(group)}: {count} samples asked, the reference has only {len(real)} images")
        options = {f: True for m, f in METRIC_FLAGS.items() if m in group}
        if "is" in group:
            options["isc_splits"] = asked["is"].get("splits", 10)
        if "kid" in group:
            subset = asked["kid"].get("subset_size", 1000)
            options["kid_subset_size"] = min(subset, count, len(real))
            if options["kid_subset_size"] < subset:
                notes.append(f"kid: subset size {options['kid_subset_size']} (asked {subset}) for lack of samples")
        common = {"cuda": device.type == "cuda", "batch_size": evaluate.get("batch_size", 256), "verbose": progress,
                  "save_cpu_ram": True, "samples_shuffle": True, **kwargs}
        # torch-fidelity moves its extractor and batches with .cuda(), i.e. to the current device:
        # make that the run's (cuda:1 for a tune worker on the second GPU), not cuda:0
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            out, reference = calculate(fake, real if binary else None, name, protocol.get("weights_sha256", ""), options, common)
        results.update({k: float(v) for k, v in out.items()})
        if reference:
            protocol["reference_features"] = reference
    return {"metrics": results, "protocol": protocol, "notes": notes}


def calculate(fake: torch.Tensor, real: torch.Tensor | None, extractor: str, weights: str, options: dict,
              common: dict) -> tuple[dict, str | None]:
    """What `torch_fidelity.calculate_metrics(input1=fake, input2=real, feature_extractor=extractor,
    **options, **common)` gives (the same functions in the same order), with the features of
    `real` from the cache when an earlier call extracted them. Returns the metrics and whether the
    reference features were "cached" or "extracted" (None without a reference)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id, resolve_feature_layer_for_metric

    kwargs = {**common, **options, "feature_extractor": extractor, "input1": ImageSet(fake),
              "input2": None if real is None else ImageSet(real)}
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in METRIC_FLAGS.values() if options.get(m)}
    feature_layers = sorted(set(layers.values()))
    model = create_feature_extractor(extractor, feature_layers, **kwargs)
    features_1 = extract_featuresdict_from_input_id(1, model, **kwargs)
    features_2, reference = None, None
    if real is not None:
        key = [extractor, weights, *feature_layers, _torch_fidelity().__version__, "cuda" if common["cuda"] else "cpu"]
        features_2, reference = _cached_features(real, key, lambda: extract_featuresdict_from_input_id(2, model, **kwargs))
    metrics = {}
    if "isc" in layers:
        metrics.update(isc_featuresdict_to_metric(features_1, layers["isc"], **kwargs))
    if "fid" in layers:
        metrics.update(fid_statistics_to_metric(fid_featuresdict_to_statistics(features_1, layers["fid"]),
                                                fid_featuresdict_to_statistics(features_2, layers["fid"]), common["verbose"]))
    if "kid" in layers:
        metrics.update(kid_featuresdict_to_metric(features_1, features_2, layers["kid"], **kwargs))
    if "prc" in layers:
        metrics.update(prc_featuresdict_to_metric(features_1, features_2, layers["prc"], **kwargs))
    return metrics, reference


def cache_folder() -> Path:
    return Path(os.environ.get("GENSPEC_CACHE") or Path.home() / ".cache" / "genspec") / "fidelity"


def _cached_features(images: torch.Tensor, key: list[str], extract) -> tuple[dict, str]:
    """The features of `images` under `key` from the cache (a plain tensor file, read with
    weights_only), else `extract()`, written atomically for the next run."""
    digest = hashlib.sha256("\0".join([*key, str(tuple(images.shape))]).encode())
    digest.update(images.contiguous().numpy().tobytes())
    path = cache_folder() / f"reference-{digest.hexdigest()[:40]}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "cached"
    except Exception:  # absent, damaged or not a plain tensor file: extract afresh (and replace it)
        pass
    features = extract()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({k: v.cpu() for k, v in features.items()}, tmp)
        os.replace(tmp, path)  # atomic: runs of a study in parallel never read half a file
    except OSError:
        pass  # a read-only home: the metrics do not need the cache
    return features, "extracted"


def inception_score_by_splits(run, splits: list[int], samples: int | None = None, seed: int = 0) -> list[dict]:
    """IS of a finished run's samples for several split counts (the coursework's n_splits table),
    with the run's own extractor: features extracted once, then torch-fidelity's IS per split count."""
    _torch_fidelity()  # a clear install hint if it is missing
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from genspec.compiler.model import choose_device
    from genspec.graph.grids import generator_of
    from genspec.measure.sampling import generator_parts, sample_images

    evaluate = run.spec.evaluate
    source = generator_of(run.spec)
    if source is None:
        raise RunError(f"{run.folder}: no network of this run maps a latent to the data shape")
    extractor = choose_extractor(evaluate)
    if extractor == "inception":
        weights = inception_weights(evaluate)
        _safe_check(weights)
        name, options = "inception-v3-compat", {"feature_extractor_weights_path": str(weights)}
    else:
        name, _ = classifier_extractor(extractor["classifier"], extractor.get("network"))
        options = {}
    n = samples or (evaluate.get("is") or {}).get("samples", DEFAULT_SAMPLES)
    torch.manual_seed(seed)
    module, prior, conditions = generator_parts(run, source)
    with torch.no_grad():
        images = torch.cat([sample_images(module, prior, min(256, n - i), "cpu", conditions) for i in range(0, n, 256)])
        images = to_uint8(images, run.spec.data.get("range", [0, 1]))
        if extractor == "inception" and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        extractor_class = FEATURE_EXTRACTORS_REGISTRY[name]
        layer = extractor_class.get_default_feature_layer_for_metric("isc")
        # The samples are drawn on the CPU (the same images on any machine); the feature extractor,
        # the costly part (Inception: ~0.2 s an image on a CPU), runs on the GPU when there is one.
        device = choose_device(run.spec.train["device"])
        model = extractor_class(name, [layer], **options).eval().to(device)
        features = torch.cat([model(images[i:i + 256].to(device))[0].cpu() for i in range(0, n, 256)])
    rows = []
    for k in splits:
        if k > n:
            raise RunError(f"{k} splits of {n} samples: ask for fewer splits or more samples (--samples)")
        out = isc_features_to_metric(features, splits=k, shuffle=True, rng_seed=2020)
        rows.append({"splits": k, "inception_score_mean": float(out["inception_score_mean"]),
                     "inception_score_std": float(out["inception_score_std"])})
    return rows
