"""What a classifier makes of a generator's samples, and the signs of a collapsed run.

For a conditional generator the samples are drawn per conditioning label and a classifier run
labels them: row k of the table counts the classes of the samples asked to be k, so a
generator that ignores its label, or draws one digit whatever it is asked, shows at once. An
unconditional generator gets the histogram of its samples' classes. Without a classifier only
the per-pixel spread across samples is measured; a spread near zero means every sample is the
same image, whatever the metric says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genspec.lang.spec import Spec

SAMPLES_PER_LABEL = 100
SPREAD_SAMPLES = 1000


def classifier_run_of(spec: Spec) -> str | None:
    """The classifier run a spec already names: its sample metrics' extractor, else the features
    its label balancing reads."""
    from genspec.measure.fidelity import choose_extractor, requested

    extractor = choose_extractor(spec.evaluate) if requested(spec.evaluate) else spec.evaluate.get("extractor")
    if isinstance(extractor, dict) and isinstance(extractor.get("classifier"), str):
        return extractor["classifier"]
    features = spec.train.get("balance", {}).get("features")
    if isinstance(features, dict) and isinstance(features.get("classifier"), str):
        return features["classifier"]
    return None


def label_condition(spec: Spec, source: tuple) -> int | None:
    """Position among the generator's conditions of its categorical label latent, if it has one."""
    for i, name in enumerate(source[2]):
        if spec.latents[name].prior == "categorical":
            return i
    return None


def classify_fn(run_dir: str, device, value_range):
    """images (the generator's range) -> class indices, by a finished classifier run's network."""
    from genspec.measure.fidelity import adapt_images, load_classifier, to_uint8

    run, network = load_classifier(run_dir, device=device)
    module, shape = run.networks[network], tuple(run.spec.networks[network].input)

    def classify(images: torch.Tensor) -> torch.Tensor:
        x = adapt_images(to_uint8(images, value_range), shape, run.spec.data.get("range", [0, 1]))
        with torch.no_grad():
            return module(x.to(device)).argmax(1).cpu()

    return classify, int(run.spec.networks[network].info.output[0])


def generate_for_label(module, prior, conditions: list, position: int | None, label: int | None, n: int, device):
    """n samples, with the label condition fixed to `label` (one-hot) when there is one."""
    draws = [c.sample(n, device) for c in conditions]
    if position is not None and label is not None:
        classes = conditions[position].shape[0]
        draws[position] = torch.nn.functional.one_hot(torch.full((n,), label, device=device), classes).float()
    return module(prior.sample(n, device), *draws)


def sample_labels(spec: Spec, model, per_label: int = SAMPLES_PER_LABEL) -> dict | None:
    """The classifier's classes of generated samples: per asked label for a conditional generator
    (`counts[k][c]`: samples asked to be k that were classified c), else one histogram. Also the
    per-pixel spread across samples. None when the spec has no generator of data-shaped images."""
    from genspec.graph.grids import generator_of
    from genspec.measure.sampling import generator_parts

    source = generator_of(spec)
    if source is None:
        return None
    module, prior, conditions = generator_parts(model, source)
    value_range = spec.data.get("range", [0, 1])
    batch = spec.evaluate["batch_size"]
    out: dict = {}
    model.train(False)
    with torch.no_grad():
        spread = torch.cat([generate_for_label(module, prior, conditions, None, None, min(batch, SPREAD_SAMPLES - i),
                                               model.device).cpu()
                            for i in range(0, SPREAD_SAMPLES, batch)])
        out["pixel_spread"] = float(spread.float().std(0).mean() / (value_range[1] - value_range[0]))
        run_dir = classifier_run_of(spec)
        if run_dir is not None and Path(run_dir, "checkpoint.pt").exists():
            classify, classes_out = classify_fn(run_dir, model.device, value_range)
            position = label_condition(spec, source)
            out["classifier"] = run_dir
            if position is None:
                out["histogram"] = torch.bincount(classify(spread), minlength=classes_out).tolist()
            else:
                labels = conditions[position].shape[0]
                counts = []
                for k in range(labels):
                    classes = torch.cat([classify(generate_for_label(module, prior, conditions, position, k,
                                                                     min(batch, per_label - i), model.device))
                                         for i in range(0, per_label, batch)])
                    counts.append(torch.bincount(classes, minlength=classes_out).tolist())
                out["counts"] = counts
                out["histogram"] = [sum(row[c] for row in counts) for c in range(len(counts[0]))]
                out["agreement"] = sum(counts[k][k] for k in range(labels)) / (labels * per_label)
    model.train(True)
    return out
