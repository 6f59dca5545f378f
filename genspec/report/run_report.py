"""Stage 8: what a person reads: layer tables, loss curves, the graph picture, report.md.

Table rendering is torch-free (used by `genspec show`); plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path

from genspec.errors import plural, writing
from genspec.graph.picture import plot_graph, save_figure
from genspec.lang.rows import format_row
from genspec.lang.shapes import fmt, prior_parameters
from genspec.lang.spec import Spec
from genspec.train.hooks import REPORTING, Hook, register_hook
from genspec.train.trace import plot_trace


def network_rows(spec: Spec, name: str) -> list[dict]:
    return [_row_entry(r) for r in spec.networks[name].info.rows]


def _row_entry(r) -> dict:
    """A row as show --json gives it; a block row also lists its own rows (and its shortcut's)."""
    entry = {"index": r.index, "row": format_row(r.row), "canonical": r.row, "output": list(r.out_shape),
             "params": r.params, "trainable": 0 if r.frozen else r.params, "frozen": r.params if r.frozen else 0}
    if r.row["op"] == "block":
        entry.update(skip=r.row.get("skip"), layers=[_row_entry(inner) for inner in r.layers],
                     shortcut=[_row_entry(inner) for inner in r.shortcut])
    return entry


def _table_body(rows: list[dict], number: str = "", indent: str = "", tag: str = "") -> list[list[str]]:
    """Table lines of rows; a block's rows follow it, numbered 2.0, 2.1, ... (its shortcut's 2.s0, ...) and indented."""
    body = []
    for r in rows:
        label = f"{number}{r['index']}"
        text = indent + tag + r["row"] + (f"  (skip {r['skip']})" if r.get("skip") else "")
        body.append([label, text, fmt(r["output"]), f"{r['trainable']:,}", f"{r['frozen']:,}"])
        if "layers" in r:
            body += _table_body(r["layers"], label + ".", indent + "  ")
            body += _table_body(r["shortcut"], label + ".s", indent + "  ", "shortcut: ")
    return body


def show_json(spec: Spec) -> dict:
    return {
        "name": spec.name,
        "file": spec.file,
        "networks": {name: {"input": list(net.input), "output": list(net.info.output), "trainable": net.info.trainable,
                            "frozen": net.info.frozen, "init": net.init_text, "rows": network_rows(spec, name)}
                     for name, net in spec.networks.items()},
        "latent": {name: {"shape": list(l.shape), "prior": l.prior, "trainable": prior_parameters(l)}
                   for name, l in spec.latents.items()},
        "objectives": {name: {"networks": o.networks, "optimizer": o.optimizer, **o.optimizer_args,
                              "trainable": objective_trainable(spec, o)}
                       for name, o in spec.objectives.items()},
    }


def layer_tables(spec: Spec, markdown: bool = False) -> str:
    """Each network's table as a paper prints it, with output shapes and parameter counts."""
    blocks = []
    for name, net in spec.networks.items():
        rows = network_rows(spec, name)
        header = ["#", "layer", "output", "trainable", "frozen"]
        body = _table_body(rows)
        body.append(["", "total", fmt(net.info.output), f"{net.info.trainable:,}", f"{net.info.frozen:,}"])
        title = f"{name}  (input {fmt(net.input)}, init {net.init_text})"
        blocks.append(_table(title, header, body, markdown, numeric={0, 3, 4}, total=True))
    return "\n\n".join(blocks)


def objective_trainable(spec: Spec, objective) -> int:
    """Parameters an objective's optimiser updates: its networks' trainable ones and any flow prior's."""
    return sum(spec.networks[n].info.trainable if n in spec.networks else prior_parameters(spec.latents[n])
               for n in objective.networks if n in spec.networks or n in spec.latents)


def optimiser_table(spec: Spec, markdown: bool = False) -> str:
    """Which optimiser trains which parameters: the routing, as plain data."""
    header = ["objective", "minimises", "networks", "optimiser", "trainable"]
    from genspec.lang.expr import to_text

    body = [[name, to_text(o.minimize), ", ".join(o.networks),
             f"{o.optimizer}(" + ", ".join(f"{k}={v}" for k, v in o.optimizer_args.items()) + ")"
             + (f", then clip to [-{o.clip:g}, {o.clip:g}]" if o.clip else ""),
             f"{objective_trainable(spec, o):,}"]
            for name, o in spec.objectives.items()]
    return _table("optimisers", header, body, markdown, numeric={4})


def _table(title: str, header: list[str], body: list[list[str]], markdown: bool, numeric: set = frozenset(),
           total: bool = False) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    if total:
        return "\n".join([title, line(header), rule] + [line(r) for r in body[:-1]] + [rule, line(body[-1])])
    return "\n".join([title, line(header), rule] + [line(r) for r in body])


def write_layer_tables(spec: Spec, out: Path) -> None:
    with writing("the layer tables", out / "layers.md"):
        (out / "layers.md").write_text(layer_tables(spec, markdown=True) + "\n\n" + optimiser_table(spec, markdown=True) + "\n")


def plot_losses(history: list, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for h in history for k in h.get("train", {}) if "/" not in k})
    if not history or not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, name in zip(axes[0], names):
        ax.plot(epochs, [h["train"].get(name, float("nan")) for h in history], label="train", marker=".")
        if any(name in h.get("test", {}) for h in history):
            ax.plot(epochs, [h["test"].get(name, float("nan")) for h in history], label="test", marker=".")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, "a picture")
    return True


# Short names a paper's numbers may be given under, and where the run keeps them.
REPORTED_ALIASES = {"fid": "frechet_inception_distance", "is": "inception_score_mean", "is_std": "inception_score_std",
                    "kid": "kernel_inception_distance_mean"}


def _grid_caption(spec: Spec, kind: str) -> list[str]:
    """What a grid shows, in a line above it."""
    captions = {
        "samples": "Images generated from draws of the prior.",
        "reconstructions": "Test images (odd columns) each followed by its reconstruction (the column to its right).",
        "interpolations": (f"Each row: {spec.evaluate['interpolation_steps']} images along a straight line between two "
                           "draws of the latent, from left to right."),
    }
    return [captions[kind], ""] if kind in captions else []


def flat_results(metrics: dict) -> dict:
    """Every number a run produced, by name: test losses, accuracy, sample metrics, real-data metrics."""
    out = {**metrics.get("test", {}), **metrics.get("fidelity", {})}
    out.update({f"{name}_best": value for name, value in metrics.get("best_test", {}).items()})
    if "test_accuracy" in metrics:
        out["test_accuracy"] = metrics["test_accuracy"]
    for key, value in metrics.get("real", {}).items():
        if isinstance(value, (int, float)):
            out.setdefault(key, value)  # a classifier run's scores of the real data
            out[f"real.{key}"] = value
    return out


def _reported_lines(spec: Spec, metrics: dict) -> list[str]:
    source = spec.source if isinstance(spec.source, dict) else {}
    reported = source.get("reported") or {}
    if not reported:
        return []
    results = flat_results(metrics)
    extractor = (metrics.get("protocol") or {}).get("extractor", "")
    lines = ["## Paper and run", "", "| metric | paper | run | run - paper |", "|---|---|---|---|"]
    for key, paper in reported.items():
        run = results.get(REPORTED_ALIASES.get(key, key))
        diff = "" if run is None else f"{run - paper:+.4g}"
        lines.append(f"| {key} | {paper:.4g} | {'not measured' if run is None else f'{run:.4g}'} | {diff} |")
    measured = any(REPORTED_ALIASES.get(k, k) in metrics.get("fidelity", {}) for k in reported)
    if measured and extractor and not extractor.startswith("inception"):
        if source.get("extractor") == "classifier":
            lines += ["", f"> The paper scored its samples with a classifier of its own; this run uses {extractor}. "
                          "Same kind of scale (1 to the number of classes), not the same classifier."]
        else:
            lines += ["", f"> The run's sample metrics use {extractor}, not Inception: they are not on the paper's scale."]
    return lines + [""]


def _quality_lines(metrics: dict) -> list[str]:
    lines = []
    if "test_accuracy" in metrics:
        lines += [f"Test accuracy: **{metrics['test_accuracy']:.4%}**", ""]
    real_split = (metrics.get("real", {}).get("protocol") or {}).get("split", "test")
    for title, values, protocol, notes in (
            ("Sample quality", metrics.get("fidelity"), metrics.get("protocol"), metrics.get("fidelity_notes", [])),
            (f"Real {real_split} set, in this run's feature space", {k: v for k, v in metrics.get("real", {}).items()
                                                            if isinstance(v, (int, float))} or None,
             metrics.get("real", {}).get("protocol"), metrics.get("real", {}).get("notes", []))):
        if not values:
            continue
        lines += [f"## {title}", "", "| metric (torch-fidelity name) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.5g} |" for k, v in values.items()]
        lines += ["", "Protocol: " + "; ".join(f"{k} = {v}" for k, v in (protocol or {}).items()), ""]
        lines += [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    return lines


def _trace_lines(spec: Spec, out: Path, metrics: dict, history: list) -> list[str]:
    names = spec.train.get("trace", [])
    collapse = metrics.get("collapse")
    flags = collapse["flags"] if collapse else []
    if not names or not plot_trace(history, names, out / "trace.png", flags):
        return []
    lines = ["## Convergence", "", "Recorded at every step ([trace.csv](trace.csv)); per epoch the mean and the "
             "min-max band of its steps.", "", "![trace](trace.png)", ""]
    if history and history[-1].get("trace"):
        lines += ["| traced | last epoch mean | last step |", "|---|---|---|"]
        lines += [f"| {name} | {s['mean']:.5g} | {s['last']:.5g} |" for name, s in history[-1]["trace"].items()]
        lines.append("")
    if collapse:
        rule = f"an epoch mean below {1 - collapse['fall']:.2g} x the highest of the {collapse['window']} epochs before"
        if flags:
            lines += [f"**Possible mode collapse** ({collapse['state']} fell suddenly; {rule}):", ""]
            lines += [f"- epoch {f['epoch']}: {collapse['state']} {f['value']:.4g}, down from {f['peak']:.4g} at epoch {f['peak_epoch']}"
                      for f in flags]
        else:
            lines.append(f"No sudden fall of {collapse['state']} ({rule}): no sign of mode collapse by this indicator.")
        lines.append("")
    return lines


def _balance_lines(metrics: dict) -> list[str]:
    balance = metrics.get("balance")
    if not balance:
        return []
    classes = range(len(balance["counts"]))
    return ["## Label balancing (CGAN-MBL)", "",
            "Generated images of the last balancing, labelled by the nearest class mean in Mahalanobis distance, and the "
            "label-sampling weights that followed:", "",
            "| class | " + " | ".join(str(k) for k in classes) + " |", "|---" * (len(balance["counts"]) + 1) + "|",
            "| images | " + " | ".join(str(c) for c in balance["counts"]) + " |",
            "| weight | " + " | ".join(f"{w:.3f}" for w in balance["weights"]) + " |", ""]


# The signs of a collapsed run: IS this close to its floor of 1, one class above this share of
# the samples, a per-pixel spread (std across samples, over the data's range) below this.
IS_FLOOR_MARGIN, MAJORITY, MIN_SPREAD = 0.1, 0.5, 0.01


def collapse_warnings(metrics: dict) -> list[str]:
    """Why a finished run looks collapsed, in words (empty when nothing says so)."""
    found = []
    score = (metrics.get("fidelity") or {}).get("inception_score_mean")
    if isinstance(score, (int, float)) and score - 1 < IS_FLOOR_MARGIN:
        found.append(f"IS {score:.3f} is within {IS_FLOOR_MARGIN} of its floor of 1: the samples look like one class")
    labels = metrics.get("sample_labels") or {}
    histogram = labels.get("histogram")
    if histogram and sum(histogram):
        top = max(range(len(histogram)), key=histogram.__getitem__)
        share = histogram[top] / sum(histogram)
        if share > MAJORITY:
            found.append(f"{share:.0%} of the generated samples are classified {top}")
    spread = labels.get("pixel_spread")
    if isinstance(spread, (int, float)) and spread < MIN_SPREAD:
        found.append(f"the per-pixel spread across samples is {spread:.4f} of the data's range: "
                     "the samples are (nearly) one image")
    return found


def plot_label_counts(labels: dict, path: Path) -> bool:
    """Row k: the classes a classifier gives samples asked to be k (shares of the row), with the
    share that matches on the diagonal. False when there is nothing to draw."""
    counts = labels.get("counts")
    if not counts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [[v / max(1, sum(row)) for v in row] for row in counts]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis")
    for k in range(min(len(shares), len(shares[0]))):
        ax.text(k, k, f"{shares[k][k]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if shares[k][k] > 0.5 else "white")
    ax.set_xlabel("class given by the classifier")
    ax.set_ylabel("label asked of the generator")
    ax.set_xticks(range(len(shares[0])))
    ax.set_yticks(range(len(shares)))
    ax.set_title(f"Labels of generated samples (agreement {labels['agreement']:.1%})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    fig.tight_layout()
    save_figure(fig, path, "a picture")
    return True


def _collapse_lines(metrics: dict) -> list[str]:
    found = collapse_warnings(metrics)
    if not found:
        return []
    return ["> **Warning: this run looks collapsed.** " + "; ".join(found) + ".", ""]


def _label_lines(metrics: dict, out: Path) -> list[str]:
    """The classifier's classes of generated samples: per asked label (a conditional generator's
    table and picture) or one histogram, and the per-pixel spread."""
    found = metrics.get("sample_labels")
    if not found:
        return []
    lines = ["## Labels of generated samples", ""]
    counts, histogram = found.get("counts"), found.get("histogram")
    if counts:
        classes = range(len(counts[0]))
        lines += [f"Samples drawn for each label and classified by {found['classifier']}: row k counts the classes of "
                  f"the {sum(counts[0])} samples asked to be k. Label agreement: **{found['agreement']:.1%}** "
                  f"(chance {1 / len(counts):.0%}).", ""]
        if plot_label_counts(found, out / "labels.png"):
            lines += ["![labels](labels.png)", ""]
        lines += ["| asked \\ classified | " + " | ".join(str(c) for c in classes) + " | agreement |",
                  "|---" * (len(counts[0]) + 2) + "|"]
        lines += [f"| {k} | " + " | ".join(str(v) for v in row) + f" | {row[k] / max(1, sum(row)):.0%} |"
                  for k, row in enumerate(counts)]
        lines.append("")
    elif histogram:
        lines += [f"Classes given by {found['classifier']} to {sum(histogram)} samples:", "",
                  "| class | " + " | ".join(str(c) for c in range(len(histogram))) + " |",
                  "|---" * (len(histogram) + 1) + "|", "| samples | " + " | ".join(str(v) for v in histogram) + " |", ""]
    lines += [f"Per-pixel spread across samples (std, as a share of the data's range): {found['pixel_spread']:.4f}.", ""]
    return lines


def write_report(spec: Spec, out: Path, metrics: dict, history: list) -> None:
    has_curves = plot_losses(history, out / "losses.png")
    plot_graph(spec.graph_nx, out / "graph.png", f"{spec.name}: dependency graph, data flowing left to right")
    source = spec.source
    source_text = source if isinstance(source, str) else (source or {}).get("paper", "")
    lines = [f"# {spec.name}", ""]
    if source_text:
        lines += [f"Source: {source_text}" + (f", {source['table']}" if isinstance(source, dict) and source.get("table") else ""), ""]
    if isinstance(source, dict) and source.get("notes"):
        lines += [f"> {source['notes']}", ""]  # what the spec's author wants a reader of its numbers to know
    lines += [f"Spec: `{spec.file}`; resolved copy: [spec.resolved.yaml](spec.resolved.yaml). "
              f"Device {metrics['device']}, seed {metrics['seed']}, {plural(metrics['epochs'], 'epoch')}, "
              f"{metrics['time_per_epoch_s'] or 0:.2f} s per epoch; data {metrics['data']['dataset']} "
              f"({metrics['data']['train']} train / {metrics['data']['test']} test).", ""]
    for note in metrics["data"].get("notes", []):
        lines += [f"> Note: {note}", ""]
    lines += ["## Test-set losses", "", "| loss | test | lowest test (epoch) | train (last epoch) |", "|---|---|---|---|"]
    untrained = False
    best, best_epoch = metrics.get("best_test", {}), metrics.get("best_test_epoch", {})
    for name, value in metrics["test"].items():
        train = metrics["train_last_epoch"].get(name)
        untrained |= train is None
        lowest = f"{best[name]:.5g} ({best_epoch[name]})" if name in best else "–"
        lines.append(f"| {name} | {value:.5g} | {lowest} | {'–' if train is None else f'{train:.5g}'} |")
    lines.append("")
    if untrained:
        lines += ["–: no training phase computes this loss; it is evaluated on the test set only.", ""]
    lines[2:2] = _collapse_lines(metrics)  # first thing a reader sees
    lines += _quality_lines(metrics)
    lines += _reported_lines(spec, metrics)
    lines += _label_lines(metrics, out)
    for kind, file in metrics.get("grids", {}).items():
        lines += [f"## {kind.capitalize()}", "", *_grid_caption(spec, kind), f"![{kind}]({file})", ""]
    if has_curves:
        lines += ["## Loss curves", "", "![losses](losses.png)", ""]
    lines += _trace_lines(spec, out, metrics, history)
    lines += _balance_lines(metrics)
    lines += ["## Networks", "", layer_tables(spec, markdown=True), "", optimiser_table(spec, markdown=True), "",
              "## Dependency graph", "", "![graph](graph.png)", "",
              "Per-epoch metrics: [metrics.jsonl](metrics.jsonl); final: [metrics.json](metrics.json).", ""]
    with writing("the report", out / "report.md"):
        (out / "report.md").write_text("\n".join(lines))


__all__ = ["layer_tables", "show_json", "write_report", "write_layer_tables", "json"]


@register_hook("report", order=REPORTING)
class ReportHook(Hook):
    """layers.md when a run starts afresh; report.md (with its pictures) once the final
    evaluation has filled `run.metrics`."""

    @classmethod
    def attach(cls, run):
        return cls() if run.world.main else None

    def run_start(self, run) -> None:
        if not run.resumed:
            write_layer_tables(run.spec, run.out)

    def run_end(self, run) -> None:
        write_report(run.spec, run.out, run.metrics, run.history)
