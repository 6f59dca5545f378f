"""The dependency graph as a picture (a run's graph.png): a layered drawing, data flowing left to right.

A straight-line drawing of these graphs misleads: a network feeds tensors several columns
away, and its edge runs through the nodes in between, so `dec -> x_rec` reads as
`dec -> kl -> x_rec`. This is the usual layered (Sugiyama) drawing instead:

1. Each node gets a column: the longest data path to it. A node nothing flows into (an input,
   a latent, a network, a state) sits in the column just before its first use.
2. An edge that spans several columns gets a waypoint in each column between, so every drawn
   segment joins neighbouring columns and cannot pass through a node.
3. Within each column, nodes are ordered by the mean position of their neighbours, sweeping
   right and left a few times, keeping the order with the fewest crossings.

Update edges (an objective to the networks it trains, a state's update to the state) would
cross the whole picture backwards; each objective names its networks underneath instead.
Params and constant labels are left out: they are numbers, not data flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from genspec.errors import writing

HIDDEN_KINDS = {"param", "label"}
# Left to right, top to bottom in a column before ordering; also the legend's order.
KIND_ORDER = ["input", "latent", "state", "network", "tensor", "loss", "update", "objective"]
COLOURS = {"input": "#9ecae1", "latent": "#c6dbef", "state": "#fee391", "network": "#fdae6b", "tensor": "#e5f5e0",
           "loss": "#fcbba1", "update": "#fee391", "objective": "#bcbddc"}
MARKERS = {"network": "s", "objective": "D", "update": "p"}  # the rest are circles
NODE_SIZE = 1500  # points^2, as matplotlib's scatter takes it
SWEEPS = 8


@dataclass
class Layout:
    """Where each node and waypoint goes, and each data edge as the points it passes through."""

    position: dict[str, tuple[float, float]]
    paths: list[list[str]]  # [source, waypoint..., target]
    waypoints: set[str]

    @property
    def columns(self) -> int:
        return 1 + max((x for x, _ in self.position.values()), default=0)


def shown_graph(g: nx.DiGraph) -> nx.DiGraph:
    """The data edges between the nodes a picture shows."""
    shown = nx.DiGraph()
    shown.add_nodes_from((n, attrs) for n, attrs in g.nodes(data=True) if attrs["kind"] not in HIDDEN_KINDS)
    shown.add_edges_from((u, v) for u, v, rel in g.edges(data="rel")
                         if rel == "data" and u in shown and v in shown)
    return shown


def columns_of(data: nx.DiGraph) -> dict[str, int]:
    """Longest-path columns, with each source moved up to just before its first use."""
    order = list(nx.topological_sort(data))
    column: dict[str, int] = {}
    for node in order:
        column[node] = max((column[p] + 1 for p in data.predecessors(node)), default=0)
    for node in order:
        if data.in_degree(node) == 0 and data.out_degree(node) > 0:
            column[node] = min(column[s] for s in data.successors(node)) - 1
    return column


def _initial_key(data: nx.DiGraph, node: str) -> tuple:
    kind = data.nodes[node]["kind"]
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), data.nodes[node]["name"])


def _split_long_edges(data: nx.DiGraph, column: dict[str, int]) -> tuple[list[list[str]], set[str]]:
    paths, waypoints = [], set()
    for u, v in sorted(data.edges):
        between = [f"{u} -> {v} @{c}" for c in range(column[u] + 1, column[v])]
        for c, waypoint in zip(range(column[u] + 1, column[v]), between):
            column[waypoint] = c
        waypoints.update(between)
        paths.append([u, *between, v])
    return paths, waypoints


def _crossings(order: list[list[str]], segments: set[tuple[str, str]]) -> int:
    index = {node: i for col in order for i, node in enumerate(col)}
    total = 0
    for left, right in zip(order, order[1:]):
        between = [(index[a], index[b]) for a, b in segments if a in left and b in right]
        total += sum(1 for i, (a1, b1) in enumerate(between) for a2, b2 in between[i + 1:]
                     if (a1 - a2) * (b1 - b2) < 0)
    return total


def _sweep(order: list[list[str]], neighbours: dict[str, list[str]], columns: range) -> None:
    """Reorder each column in `columns` by the mean position of its nodes' neighbours in the column swept before."""
    step = 1 if columns.step > 0 else -1
    position = {node: i for col in order for i, node in enumerate(col)}
    for c in columns:
        before = set(order[c - step])

        def barycentre(node: str) -> float:
            near = [position[n] for n in neighbours[node] if n in before]
            return sum(near) / len(near) if near else position[node]

        order[c].sort(key=barycentre)
        position.update({node: i for i, node in enumerate(order[c])})


def layered_layout(data: nx.DiGraph) -> Layout:
    """Columns, waypoints and an order within each column with few crossings; deterministic."""
    column = columns_of(data)
    paths, waypoints = _split_long_edges(data, column)
    segments = {(a, b) for path in paths for a, b in zip(path, path[1:])}
    neighbours: dict[str, list[str]] = {node: [] for node in column}
    for a, b in sorted(segments):
        neighbours[a].append(b)
        neighbours[b].append(a)
    width = 1 + max(column.values(), default=0)
    order = [[] for _ in range(width)]
    real = sorted((n for n in column if n not in waypoints), key=lambda n: _initial_key(data, n))
    for node in real + sorted(waypoints):
        order[column[node]].append(node)
    best, fewest = [list(col) for col in order], _crossings(order, segments)
    for _ in range(SWEEPS):
        _sweep(order, neighbours, range(1, width))
        _sweep(order, neighbours, range(width - 2, -1, -1))
        crossings = _crossings(order, segments)
        if crossings < fewest:
            best, fewest = [list(col) for col in order], crossings
    height = _heights(best, neighbours, waypoints)
    top = min(height.values(), default=0)
    position = {node: (c, height[node] - top) for c, col in enumerate(best) for node in col}
    return Layout(position, paths, waypoints)


def _gap(a: str, b: str, waypoints: set[str]) -> float:
    # a waypoint is only a bend in a line: two of them may sit closer than a line and a node
    return 0.5 if a in waypoints and b in waypoints else 1.0


def _heights(order: list[list[str]], neighbours: dict[str, list[str]], waypoints: set[str]) -> dict[str, float]:
    """Heights that keep each column's order and spacing, pulled towards the mean of each node's neighbours.

    Straightens edges: a node sits level with what it joins where its column leaves room.
    """
    tallest = max((len(col) for col in order), default=1)
    height = {node: (tallest - len(col)) / 2 + i for col in order for i, node in enumerate(col)}
    for _ in range(SWEEPS):
        for col in order:
            wanted = [sum(height[n] for n in neighbours[node]) / len(neighbours[node]) if neighbours[node]
                      else height[node] for node in col]
            # the lowest heights at or above `wanted` that keep the spacing, from the top down; the highest at or
            # below it, from the bottom up; their mean keeps the spacing too and favours neither end
            down, up = list(wanted), list(wanted)
            for i in range(1, len(col)):
                down[i] = max(down[i], down[i - 1] + _gap(col[i - 1], col[i], waypoints))
            for i in range(len(col) - 2, -1, -1):
                up[i] = min(up[i], up[i + 1] - _gap(col[i], col[i + 1], waypoints))
            height.update({node: (d + u) / 2 for node, d, u in zip(col, down, up)})
    return height


def node_label(g: nx.DiGraph, node: str) -> str:
    attrs = g.nodes[node]
    if attrs["kind"] == "latent":
        return f"{attrs['name']}\n~ {attrs.get('prior', 'prior')}"
    if attrs["kind"] == "update":
        return f"new {attrs['name']}"
    return attrs["name"]


def updated_by(g: nx.DiGraph, node: str) -> list[str]:
    return sorted(g.nodes[v]["name"] for _, v, rel in g.out_edges(node, data="rel") if rel == "updates")


def plot_graph(g: nx.DiGraph, path: Path, title: str) -> None:
    """Draw the graph's data flow into `path` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    data = shown_graph(g)
    layout = layered_layout(data)
    tallest = 1 + max((y for _, y in layout.position.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * layout.columns), max(3.5, 0.95 * tallest + 1.4)))
    radius = NODE_SIZE ** 0.5 / 2  # points: where an arrow must stop to show its head
    for route in layout.paths:
        xs, ys = zip(*(layout.position[n] for n in route))
        ax.plot(xs, ys, color="#555555", linewidth=1, zorder=1)
        ax.add_patch(FancyArrowPatch(layout.position[route[-2]], layout.position[route[-1]], arrowstyle="-|>",
                                     mutation_scale=12, color="#555555", linewidth=1, zorder=2,
                                     shrinkA=0 if route[-2] in layout.waypoints else radius, shrinkB=radius + 3))
    for node in data.nodes:
        kind = data.nodes[node]["kind"]
        x, y = layout.position[node]
        ax.scatter([x], [y], s=NODE_SIZE, marker=MARKERS.get(kind, "o"), color=COLOURS.get(kind, "#dddddd"),
                   edgecolors="#555555", linewidths=0.6, zorder=3)
        ax.text(x, y, node_label(g, node), ha="center", va="center", fontsize=7, zorder=4)
        if updated_by(g, node):
            ax.text(x, y + 0.42, "updates " + ", ".join(updated_by(g, node)), ha="center", va="top", fontsize=7,
                    color="#54278f", zorder=4)
    ax.set_xlim(-0.6, layout.columns - 0.4)
    ax.set_ylim(tallest - 0.3, -0.7)  # first node of a column on top
    ax.axis("off")
    shown_kinds = {kind for _, kind in data.nodes(data="kind")}
    legend = [Line2D([], [], linestyle="", marker=MARKERS.get(k, "o"), markersize=9, markerfacecolor=COLOURS[k],
                     markeredgecolor="#555555", label=k) for k in KIND_ORDER if k in shown_kinds]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(legend), frameon=False,
              fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, "the graph picture", dpi=100)


def save_figure(fig, path, what: str, dpi: int = 110) -> None:
    """Save a matplotlib figure and close it, failure or not; a refused write names `what`."""
    import matplotlib.pyplot as plt

    try:
        with writing(what, path):
            fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
