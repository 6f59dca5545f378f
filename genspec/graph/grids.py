"""Where each of evaluate.grids' pictures comes from, decided from the spec and its graph alone
(no torch), so that `genspec validate` refuses a grid with no source instead of the run.

samples and interpolations decode draws of a latent with the generator (`generator_of`), the
network that turns a latent into an image of the data's shape; reconstructions show a graph
tensor of the data's shape computed from x by a network (`reconstruction_of`). The mapping form,
`grids: {samples: x_gen}`, names the graph tensor each grid shows, computed on test batches.
"""

from __future__ import annotations

import networkx as nx

from genspec.errors import Collector
from genspec.lang import expr as E
from genspec.lang.shapes import fmt
from genspec.lang.spec import Spec

GENERATED = ("samples", "interpolations")


def generator_of(spec: Spec) -> tuple | None:
    """(network, latent, condition latents) that turn latent draws into an image of the data's
    shape. A conditional generator's conditions must be latents (a CGAN's categorical labels):
    a condition on the data's labels y, or a plain shape, has nothing to draw it from."""
    for net_name, net in _image_makers(spec):
        conditions = tuple(source for _, source in net.conditions.values())
        if not all(source in spec.latents for source in conditions):
            continue
        for latent_name, latent in spec.latents.items():
            if tuple(latent.shape) == tuple(net.input) and latent_name not in conditions:
                return net_name, latent_name, conditions
    return None


def _image_makers(spec: Spec):
    """The networks whose output is one tensor of the data's shape."""
    return [(name, net) for name, net in spec.networks.items()
            if tuple(net.info.output) == tuple(spec.data_shape) and net.info.kind == "tensor"]


def _ancestors(g: nx.DiGraph, node: str) -> set[str]:
    """What a node's value is computed from, along data edges (graph/dependencies.data_ancestors)."""
    data = g.edge_subgraph([(u, v) for u, v, rel in g.edges(data="rel") if rel == "data"])
    return nx.ancestors(data, node) if node in data else set()


def reconstruction_of(spec: Spec, g: nx.DiGraph, generator: str | None) -> str | None:
    """A graph tensor of the data's shape computed from the input x by the generator, or else by
    another network (BEGAN's discriminator decoder, dec(enc(x)))."""
    candidates = []
    for name, expr in spec.graph.items():
        if _is_image(g, name, spec.data_shape) and "input:x" in _ancestors(g, f"tensor:{name}") \
                and isinstance(expr, E.Call) and expr.func in spec.networks:
            candidates.append((expr.func != generator, name))
    return min(candidates)[1] if candidates else None


def _is_image(g: nx.DiGraph, tensor: str, shape: tuple | None = None) -> bool:
    """Whether a graph tensor holds images: of `shape` if given, else any channels-height-width
    tensor of 1 or 3 channels."""
    value = g.nodes[f"tensor:{tensor}"].get("value")
    if value is None or value.kind != "tensor" or value.samples:  # k draws per example: not one image each
        return False
    if shape is not None:
        return tuple(value.shape) == tuple(shape)
    return len(value.shape) == 3 and value.shape[0] in (1, 3)


def grid_sources(spec: Spec, g: nx.DiGraph) -> dict:
    """kind -> what its grid shows: ("generator", network, latent, condition latents) or
    ("tensor", name); None for a kind with no source (`grid_problems` says why)."""
    grids = spec.evaluate.get("grids", [])
    if isinstance(grids, dict):
        return {kind: ("tensor", tensor) for kind, tensor in grids.items()}
    generator = generator_of(spec)
    out = {}
    for kind in grids:
        if kind in GENERATED:
            out[kind] = ("generator", *generator) if generator else None
        else:  # reconstructions
            source = reconstruction_of(spec, g, generator[0] if generator else None)
            out[kind] = ("tensor", source) if source else None
    return out


def grid_problems(spec: Spec, g: nx.DiGraph, problems: Collector) -> None:
    """A grid with no source, or a named tensor that holds no images, at its evaluate.grids entry."""
    grids = spec.evaluate.get("grids", [])
    if isinstance(grids, dict):
        for kind, tensor in grids.items():
            if f"tensor:{tensor}" in g and not _named_tensor_fits(g, kind, tensor, spec.data_shape):
                problems.add(("evaluate", "grids", kind), _not_images(g, kind, tensor, spec))
        return
    for i, (kind, source) in enumerate(grid_sources(spec, g).items()):
        if source is None:
            problems.add(("evaluate", "grids", i), missing_source(spec, g, kind))


def _named_tensor_fits(g: nx.DiGraph, kind: str, tensor: str, data_shape: tuple) -> bool:
    # reconstructions stand beside the originals, so they have the data's shape
    return _is_image(g, tensor, data_shape if kind == "reconstructions" else None)


def _not_images(g: nx.DiGraph, kind: str, tensor: str, spec: Spec) -> str:
    value = g.nodes[f"tensor:{tensor}"].get("value")
    got = "of unknown type" if value is None else (f"a {value.kind}" + (f" of shape {fmt(value.shape)}" if value.shape else "")
                                                   + (f" with {value.samples} draws per example" if value.samples else ""))
    wanted = (f"a tensor of the data's shape {fmt(spec.data_shape)}, beside the originals" if kind == "reconstructions"
              else "images (a tensor of 1 or 3 channels by height by width)")
    return f"{tensor!r} is {got}; a {kind} grid shows {wanted}"


def missing_source(spec: Spec, g: nx.DiGraph, kind: str) -> str:
    """Why a grid kind has no source, and what to write instead."""
    if kind == "reconstructions":
        return ("no graph tensor reconstructs x (a network's output of the data's shape computed from x), so there is no "
                "reconstructions grid; name the tensor that shows one, e.g. grids: {reconstructions: x_rec}, or leave "
                "reconstructions out")
    conditioned = _conditioned_on_data(spec)
    if conditioned is None:
        return (f"no network turns a latent's draws into an image of the data's shape {fmt(spec.data_shape)}, so there "
                f"are no {kind} to draw; leave {kind} out of evaluate.grids, or name a graph tensor of images: "
                f"grids: {{{kind}: TENSOR}}")
    net, condition, source = conditioned
    why = (f"network {net!r} makes images from a latent, but its condition {condition!r} is "
           + ("the data's labels y" if source == "y" else "an input the graph supplies")
           + f", which a draw of the prior does not have, so there are no {kind} to draw")
    categorical = f"condition {condition!r} on a categorical latent (condition: {{{condition}: c}}) as a CGAN does"
    if kind == "interpolations":  # a named tensor is shown as it is: it cannot walk between two draws
        return f"{why}; leave interpolations out, or {categorical}"
    drawn = _drawn_tensor(spec, g, net)
    if drawn is None:
        example = f"grids: {{samples: x_gen}} with a graph tensor x_gen: {net}(sample(LATENT), onehot(y))"
    else:
        example = f"grids: {_mapping_text(spec, g, drawn)} ({drawn} is {E.to_text(spec.graph[drawn])}, on the test set's labels)"
    return f"{why}; name the graph tensor that shows them, e.g. {example}, or {categorical}"


def _mapping_text(spec: Spec, g: nx.DiGraph, samples: str) -> str:
    """The list of grids rewritten as the mapping that names each grid's tensor: samples from
    `samples`, reconstructions from their tensor; interpolations, which no tensor holds, left out."""
    mapping = {"samples": samples}
    if "reconstructions" in spec.evaluate.get("grids", []):
        rebuilt = reconstruction_of(spec, g, None)
        if rebuilt:
            mapping["reconstructions"] = rebuilt
    return "{" + ", ".join(f"{kind}: {tensor}" for kind, tensor in mapping.items()) + "}"


def _conditioned_on_data(spec: Spec) -> tuple | None:
    """(network, condition, source) of an image-making network held back by a condition no
    latent draws: the data's labels y, or a plain shape fed by the graph."""
    for name, net in _image_makers(spec):
        if not any(tuple(l.shape) == tuple(net.input) for l in spec.latents.values()):
            continue
        for condition, (_, source) in net.conditions.items():
            if source not in spec.latents:
                return name, condition, source
    return None


def _drawn_tensor(spec: Spec, g: nx.DiGraph, net: str) -> str | None:
    """A graph tensor that calls `net` on latent draws without reading the images x, if any."""
    for name, expr in spec.graph.items():
        if isinstance(expr, E.Call) and expr.func == net and _is_image(g, name, spec.data_shape):
            read = _ancestors(g, f"tensor:{name}")
            if "input:x" not in read and any(n.startswith("latent:") for n in read):
                return name
    return None
