"""The layered drawing of a spec's dependency graph (graph.png)."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

import genspec
from genspec.graph.picture import _crossings, columns_of, layered_layout, plot_graph, shown_graph

SPECS = sorted(Path(__file__).resolve().parent.parent.glob("specs/*.yaml"))
CLEARANCE = 0.3  # layout units; a drawn node's radius is about a quarter of the spacing between nodes


def _distance_to_segment(point, a, b) -> float:
    (px, py), (ax, ay), (bx, by) = point, a, b
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
    return ((px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2) ** 0.5


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_no_drawn_edge_passes_through_a_node_it_does_not_join(path):
    data = shown_graph(genspec.load(path).graph_nx)
    layout = layered_layout(data)
    nodes = [n for n in layout.position if n not in layout.waypoints]
    for route in layout.paths:
        for a, b in zip(route, route[1:]):
            assert layout.position[b][0] == layout.position[a][0] + 1, (a, b)  # left to right, one column a step
            for node in nodes:
                if node not in (a, b):
                    gap = _distance_to_segment(layout.position[node], layout.position[a], layout.position[b])
                    assert gap > CLEARANCE, f"{a} -> {b} passes {gap:.2f} from {node}"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_nodes_of_a_column_do_not_overlap_and_every_edge_is_drawn(path):
    data = shown_graph(genspec.load(path).graph_nx)
    layout = layered_layout(data)
    assert sorted((route[0], route[-1]) for route in layout.paths) == sorted(data.edges)
    real = [n for n in layout.position if n not in layout.waypoints]
    assert set(real) == set(data.nodes)
    for a in real:
        for b in real:
            (xa, ya), (xb, yb) = layout.position[a], layout.position[b]
            if a != b and xa == xb:
                assert abs(ya - yb) >= 1 - 1e-9, (a, b)


def test_params_and_labels_are_left_out_and_the_objectives_updates_are_not_data_edges():
    g = genspec.load("specs/larsen_vaegan.yaml").graph_nx
    data = shown_graph(g)
    assert {kind for _, kind in data.nodes(data="kind")} == {"input", "latent", "network", "tensor", "loss",
                                                              "objective"}
    assert ("objective:dis", "net:dis") in g.edges and ("objective:dis", "net:dis") not in data.edges


def test_a_network_sits_just_before_its_first_use_not_in_the_first_column():
    data = shown_graph(genspec.load("specs/quickstart.yaml").graph_nx)
    column = columns_of(data)
    assert column["input:x"] == 0
    first_use = min(column[s] for s in data.successors("net:dec"))
    assert column["net:dec"] == first_use - 1
    assert column["objective:vae"] == max(column.values())


def test_ordering_removes_a_crossing_the_alphabetical_order_has():
    data = nx.DiGraph()
    for node, kind in [("a", "input"), ("b", "input"), ("x", "tensor"), ("y", "tensor")]:
        data.add_node(node, kind=kind, name=node)
    data.add_edges_from([("a", "y"), ("b", "x")])
    assert _crossings([["a", "b"], ["x", "y"]], set(data.edges)) == 1
    layout = layered_layout(data)
    order = [sorted((n for n in layout.position if layout.position[n][0] == c), key=lambda n: layout.position[n][1])
             for c in range(layout.columns)]
    assert _crossings(order, set(data.edges)) == 0


LAYOUT_SCRIPT = """
import genspec
from genspec.graph.picture import layered_layout, shown_graph
layout = layered_layout(shown_graph(genspec.load("specs/began.yaml").graph_nx))
print(sorted(layout.position.items()))
"""


def test_the_layout_does_not_depend_on_the_hash_seed():
    # names are strings: a set's order changes with PYTHONHASHSEED, the picture must not
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    outputs = [subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT], cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60) for seed in ("1", "2")]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    assert outputs[0].stdout == outputs[1].stdout


def test_plot_graph_writes_a_png_that_grows_with_the_graph(tmp_path):
    from PIL import Image

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    plot_graph(genspec.load("specs/mnist_classifier.yaml").graph_nx, small, "classifier")
    plot_graph(genspec.load("specs/began_vae.yaml").graph_nx, large, "began_vae")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG"
        assert b.size[0] > a.size[0] and b.size[1] >= a.size[1]


def test_graph_command_draws_the_picture_and_refuses_out_for_printed_formats(tmp_path, capsys, monkeypatch):
    from genspec.cli import main

    spec = str(Path(__file__).resolve().parent.parent / "specs/quickstart.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["graph", spec, "--format", "png"]) == 0
    assert capsys.readouterr().out == "wrote quickstart_graph.png\n"
    assert (tmp_path / "quickstart_graph.png").read_bytes().startswith(b"\x89PNG")
    assert main(["graph", spec, "--out", "g.png"]) == 1
    assert "--out is where --format png writes" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
