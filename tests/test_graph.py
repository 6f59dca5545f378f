"""Stage 4: the dependency graph, its lint (names, cycles, types, shapes, reachability) and renderings."""

from __future__ import annotations

import json

import pytest

from genspec.graph import dependencies as G
from genspec.graph.dependencies import Value
from genspec.lang.registry import EXPRESSION_OPS

from spec_helpers import QUICKSTART_TEXT, check, problems_of, quickstart_with

GRAPH_TAIL = "  x_gen: dec(sample(z))\n"
OBJECTIVE = "vae: {networks: [enc, dec], minimize: elbo, optimizer: adam(lr)}"


def with_tensor(expression: str) -> str:
    return quickstart_with((GRAPH_TAIL, GRAPH_TAIL + f"  a: {expression}\n"))


def with_minimize(expression: str) -> str:
    return quickstart_with((OBJECTIVE, OBJECTIVE.replace("minimize: elbo", f"minimize: {expression}")))


@pytest.fixture(scope="module")
def quickstart():
    return check(QUICKSTART_TEXT)


# ---------------------------------------------------------------- structure

def test_nodes(quickstart):
    assert sorted(quickstart.graph_nx.nodes) == [
        "input:x", "latent:z", "loss:elbo", "loss:kl", "loss:rec", "net:dec", "net:enc", "objective:vae",
        "param:beta", "param:lr", "param:sigma2", "tensor:q", "tensor:x_gen", "tensor:x_rec", "tensor:z"]


def test_edges(quickstart):
    edges = sorted(quickstart.graph_nx.edges(data="rel"))
    assert edges == [
        ("input:x", "loss:rec", "data"), ("input:x", "tensor:q", "data"),
        ("latent:z", "loss:kl", "data"), ("latent:z", "tensor:x_gen", "data"),  # kl(q, z) and sample(z) read the latent
        ("loss:elbo", "objective:vae", "data"), ("loss:kl", "loss:elbo", "data"), ("loss:rec", "loss:elbo", "data"),
        ("net:dec", "tensor:x_gen", "data"), ("net:dec", "tensor:x_rec", "data"), ("net:enc", "tensor:q", "data"),
        ("objective:vae", "net:dec", "updates"), ("objective:vae", "net:enc", "updates"),
        ("param:beta", "loss:elbo", "data"), ("param:sigma2", "loss:rec", "data"),
        ("tensor:q", "loss:kl", "data"), ("tensor:q", "tensor:z", "data"),  # rsample(q) reads the tensor q
        ("tensor:x_rec", "loss:rec", "data"), ("tensor:z", "tensor:x_rec", "data"),  # dec(z): the graph tensor z
    ]


def test_inferred_values(quickstart):
    nodes = quickstart.graph_nx.nodes
    assert nodes["input:x"]["value"] == Value("tensor", (1, 8, 8))
    assert nodes["tensor:q"]["value"] == Value("dist", (8,), ("enc", 3))
    assert nodes["tensor:z"]["value"] == Value("tensor", (8,))
    assert nodes["tensor:x_rec"]["value"] == Value("tensor", (1, 8, 8), ("dec", 3))
    assert nodes["tensor:x_gen"]["value"] == Value("tensor", (1, 8, 8), ("dec", 3))
    for node in ("loss:rec", "loss:kl", "loss:elbo", "objective:vae"):
        assert nodes[node]["value"].kind == "scalar"
    assert nodes["loss:rec"]["text"] == "sqerr(x_rec, x) / (2 * sigma2)"


def test_plan_orders_what_an_update_needs(quickstart):
    order = G.plan(quickstart.graph_nx, ["vae"])
    assert set(order) == {"tensor:q", "tensor:z", "tensor:x_rec", "loss:rec", "loss:kl", "loss:elbo"}  # not x_gen
    for before, after in [("tensor:q", "tensor:z"), ("tensor:z", "tensor:x_rec"), ("tensor:x_rec", "loss:rec"),
                          ("loss:rec", "loss:elbo"), ("loss:kl", "loss:elbo"), ("tensor:q", "loss:kl")]:
        assert order.index(before) < order.index(after)
    assert G.plan(quickstart.graph_nx, []) == []


def test_to_json(quickstart):
    data = G.to_json(quickstart.graph_nx)
    json.dumps(data)  # plain data
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes["tensor:q"] == {"id": "tensor:q", "kind": "tensor", "name": "q", "expr": "enc(x)",
                                 "value": {"kind": "dist", "shape": [8]}}
    assert nodes["net:enc"] == {"id": "net:enc", "kind": "network", "name": "enc"}
    assert {"from": "objective:vae", "to": "net:enc", "rel": "updates"} in data["edges"]
    assert len(data["edges"]) == 18


def test_to_dot(quickstart):
    dot = G.to_dot(quickstart.graph_nx)
    assert dot.startswith("digraph genspec {\n  rankdir=LR;\n") and dot.endswith("\n}")
    assert '  "tensor:q" [label="q\\nenc(x)", shape=oval];' in dot
    assert '  "net:enc" [label="enc", shape=box3d];' in dot
    assert '  "objective:vae" -> "net:enc" [style=dashed, label="updates"];' in dot
    assert '  "tensor:z" -> "tensor:x_rec";' in dot


def test_to_text(quickstart):
    lines = G.to_text(quickstart.graph_nx).splitlines()
    assert "input:x  [tensor 1x8x8]" in lines
    assert "tensor:q = enc(x)  [dist 8]" in lines
    assert any(line.startswith("objective:vae = elbo") and line.endswith("-> updates net:enc, net:dec") for line in lines)
    order = [line.split(" ")[0] for line in lines]
    assert order.index("tensor:q") < order.index("tensor:z") < order.index("tensor:x_rec") < order.index("loss:rec")


def test_labels_and_the_y_input():
    spec = check(quickstart_with(("  range: [0, 1]\n", "  range: [0, 1]\n  labels: true\n")))
    assert spec.graph_nx.nodes["input:y"]["value"] == Value("labels", ())


# ---------------------------------------------------------------- lint

LINT = [
    ("enc", "graph.a: 'enc' is a network: call it, e.g. enc(x)"),
    ("rec + 1", "graph.a: loss 'rec' cannot feed the graph; only losses and objectives read losses"),
    ("nll(x, y)", "graph.a: labels y are not available: set data.labels: true"),
    ("nowhere * 2", "graph.a: undefined name 'nowhere'"),
    ("foo(x)", "graph.a: unknown op or network 'foo'; known: " + ", ".join(sorted(EXPRESSION_OPS) + ["dec", "enc"])),
    ("enc.feat(x)", "graph.a: network enc has no tap 'feat'; name a row with 'as NAME'"),
    ("dec(z, z)", "graph.a: network dec takes one input, got 2"),
    ("dec(q)", "graph.a: dec: its input must be a tensor, got a dist; draw from it with rsample(...)"),
    ("dec(x)", "graph.a: dec expects input 8, got 1x8x8"),
    ("q + 1", "graph.a: cannot apply '+' to a distribution; use rsample(...) or mean_of(...)"),
    ("x + z", "graph.a: '+' of tensors of shapes 1x8x8 and 8"),
    ("sqerr(x)", "graph.a: sqerr takes 2 argument(s) (tensor, tensor), got 1"),
    ("mean(x, k=1)", "graph.a: mean takes 1 argument(s) (any), got 2"),
    ("sample(q)", "graph.a: sample: argument 1 must name a latent (latents: z)"),
    ("kl(q, q)", "graph.a: kl: argument 2 must name a latent (latents: z)"),
    ("rsample(x)", "graph.a: rsample: argument 1 must be a dist, got a tensor"),
    ("sqerr(q, x)", "graph.a: sqerr: argument 1 must be a tensor, got a dist; draw from it with rsample(...)"),
    ("sqerr(x, z)", "graph.a: sqerr of tensors of shapes 1x8x8 and 8"),
    ("[x, x]", "graph.a: expected number or string, got list [\"x\", \"x\"]"),
    ("a + x", "graph.a: cycle: a -> a"),
]


@pytest.mark.parametrize("expression, message", LINT, ids=[e for e, _ in LINT])
def test_graph_lint_messages(expression, message):
    text = with_tensor(expression)
    line = text.splitlines().index(f"  a: {expression}") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:3: {message}"]


def test_a_latent_used_as_a_tensor():
    text = quickstart_with(("  z: rsample(q)\n", "  zz: rsample(q)\n"), ("  x_rec: dec(z)\n", "  x_rec: dec(zz)\n"),
                           (GRAPH_TAIL, GRAPH_TAIL + "  a: z + 1\n"))
    (problem,) = problems_of(text)
    assert problem.endswith("graph.a: 'z' is a latent (a distribution): draw from it with sample(z)")


def test_a_cycle_through_three_tensors():
    (problem,) = problems_of(quickstart_with(("  q: enc(x)\n", "  q: enc(x_rec)\n")))
    assert problem.endswith("graph.q: cycle: q -> z -> x_rec -> q")


def test_network_output_that_does_not_fit_the_next_network_names_the_producing_row():
    text = quickstart_with(("      - fc 64, relu\n      - gaussian 8", "      - fc 64, relu  as h\n      - gaussian 8"),
                           ("  x_rec: dec(z)\n", "  x_rec: dec(enc.h(x))\n"))
    line = text.splitlines().index("      - fc 64, relu  as h") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:9: networks.enc.layers[2]: output 64 does not fit dec's input 8 (graph.x_rec)"]


def test_network_output_that_does_not_match_its_target_names_the_producing_row():
    text = quickstart_with(("      - fc 64, sigmoid\n      - reshape 1 8 8\n", "      - fc 49, sigmoid\n      - reshape 1 7 7\n"))
    line = text.splitlines().index("      - reshape 1 7 7") + 1
    assert problems_of(text) == [f"spec.yaml:{line}:9: networks.dec.layers[3]: output 1x7x7 does not match 1x8x8 in sqerr (losses.rec)"]


def test_kl_needs_matching_shapes_and_a_normal_prior():
    (problem,) = problems_of(quickstart_with(("  z: {shape: [8], prior: normal}", "  z: {shape: [8], prior: 'uniform(-1, 1)'}")))
    assert problem.endswith("losses.kl: kl: needs a normal or realnvp prior; latent 'z' is uniform")
    text = quickstart_with(("  z: {shape: [8], prior: normal}", "  z: {shape: [8], prior: normal}\n  w: {shape: 4}"),
                           ("  kl: kl(q, z)\n", "  kl: kl(q, z) + kl(q, w)\n"))
    (problem,) = problems_of(text)
    assert problem.endswith("losses.kl: kl: the posterior has shape 8 but latent 'w' has 4")


def test_loss_must_be_a_scalar():
    (problem,) = problems_of(quickstart_with(("  rec: sqerr(x_rec, x) / (2 * sigma2)", "  rec: (x_rec - x) / (2 * sigma2)")))
    assert problem.endswith("losses.rec: a loss must be a scalar, but this is a tensor of shape 1x8x8; "
                            "reduce it with mean(...) or sum(...)")


def test_objective_must_minimise_a_scalar():
    text = with_minimize("x_rec")
    line = text.splitlines().index("  " + OBJECTIVE.replace("elbo", "x_rec")) + 1
    assert problems_of(text) == [f"spec.yaml:{line}:31: objectives.vae.minimize: a loss must be a scalar, but this is a "
                                 "tensor of shape 1x8x8; reduce it with mean(...) or sum(...)"]


def test_objective_whose_loss_ignores_its_networks():
    problems = problems_of(with_minimize("kl"))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "objectives.vae.minimize: the loss does not depend on network 'dec', so this objective cannot train it"]
    problems = problems_of(with_minimize("3"))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "objectives.vae.minimize: the loss does not depend on network 'enc', so this objective cannot train it",
        "objectives.vae.minimize: the loss does not depend on network 'dec', so this objective cannot train it"]


def test_type_errors_are_not_piled_on_a_broken_expression():
    # x_rec is broken; rec and elbo, which read it, are not reported again
    problems = problems_of(quickstart_with(("  x_rec: dec(z)\n", "  x_rec: dec(z, z)\n")))
    assert len(problems) == 1 and "graph.x_rec: network dec takes one input, got 2" in problems[0]


@pytest.mark.parametrize("expression", [
    "x + x_gen", "mean(x.detach())", "abs(x - x_rec)", "mean_of(q)", "2 * x - 1", "sum(abs(x_rec))",
    "bce(x_rec, 1)", "l1(x_rec, x) + mse(x_gen, x)", "-x_rec", "dec(mean_of(q).detach())",
])
def test_well_typed_tensors_pass(expression):
    check(with_tensor(expression))


def test_tapped_gaussian_is_a_distribution():
    text = quickstart_with(("      - gaussian 8", "      - gaussian 8  as post"), ("  z: rsample(q)\n", "  z: rsample(enc.post(x))\n"))
    spec = check(text)
    assert spec.graph_nx.nodes["tensor:z"]["value"] == Value("tensor", (8,))


def test_a_network_reached_only_through_detach_is_not_trained():
    problems = problems_of(with_minimize("kl + mean(x_rec.detach())"))
    assert any("reads network 'dec' only through detach()" in p for p in problems), problems
    assert not any("'enc'" in p for p in problems), problems  # enc still gets kl's gradient


def test_detach_on_one_use_keeps_the_gradient_of_another():
    check(with_minimize("kl + mean(x_rec.detach()) + mean(x_rec)"))  # valid: dec is trained through mean(x_rec)


def test_a_long_sum_in_a_loss_is_a_located_error_not_a_crash():
    # about 500 terms, under the 2000-character limit: refused by the parser's size bound, never a RecursionError
    sum_text = "+".join(["rec"] * 500)
    text = quickstart_with(("  kl: kl(q, z)\n", "  kl: kl(q, z)\n  deep: " + sum_text + "\n"))
    line = text.splitlines().index("  deep: " + sum_text) + 1
    assert problems_of(text) == [f"spec.yaml:{line}:3: losses.deep: cannot parse {sum_text!r}: expression has more "
                                 "than 200 operations; split it into named losses"]


def test_a_sum_within_the_size_bound_is_valid():
    text = quickstart_with(("  kl: kl(q, z)\n", "  kl: kl(q, z)\n  deep: " + "+".join(["rec"] * 150) + "\n"))
    check(text)


def test_unknown_names_ops_and_layers_suggest_the_close_one():
    from spec_helpers import problems_of, quickstart_with

    assert any(p.endswith("undefined name 'nelbp'; did you mean 'elbo'?")
               for p in problems_of(quickstart_with(("minimize: elbo", "minimize: nelbp"))))
    assert any(p.endswith("unknown op or network 'decc'; did you mean 'dec'?")
               for p in problems_of(quickstart_with(("x_rec: dec(z)", "x_rec: decc(z)"))))
    assert any(p.endswith("unknown layer 'droput'; did you mean 'dropout'?")
               for p in problems_of(quickstart_with(("- fc 64, sigmoid", "- droput 0.1\n      - fc 64, sigmoid"))))
    # nothing close: no suggestion
    assert any("undefined name 'qqqqq'" in p and "did you mean" not in p
               for p in problems_of(quickstart_with(("minimize: elbo", "minimize: qqqqq"))))
