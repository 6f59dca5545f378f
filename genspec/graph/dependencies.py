"""Stage 4: the dependency graph (networkx) of inputs, latents, networks, tensors, losses and
objectives, with a lint pass: undefined names, cycles, type and shape checks of every
expression, and objectives whose loss does not reach the networks they train.

Node ids are `kind:name` (`input:x`, `latent:z`, `net:enc`, `tensor:q`, `loss:kl`,
`objective:enc`); each node's attributes hold its kind, name, expression text and the
inferred value type. Edges are data dependencies (`rel="data"`) except objective -> network
edges (`rel="updates"`), which close the training loop and are left out of cycle checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from genspec.lang import expr as E
from genspec.lang import plugins
from genspec.errors import Collector, suggest
from genspec.graph.grids import grid_problems
from genspec.lang.registry import ACTIVATIONS, EXPRESSION_OPS
from genspec.lang.shapes import fmt
from genspec.lang.spec import Spec


@dataclass(frozen=True)
class Value:
    """What an expression yields: its kind, shape, and the network row that produced it."""

    kind: str  # tensor | dist | scalar | number | labels
    shape: tuple = ()  # per example (labels: the number of classes, when known)
    producer: tuple | None = None  # (network name, row index)
    samples: int = 0  # k of rsample(q, k): the tensor has a leading axis of k draws before the batch
    family: str = "gaussian"  # of a dist: gaussian | bernoulli | categorical


class _Unknown(Exception):
    """Raised inside inference once a problem has been reported, to stop that expression."""


def build_graph(spec: Spec, problems: Collector | None = None) -> nx.DiGraph:
    """Build and lint the graph. Raises SpecError with every problem found."""
    own = problems is None
    problems = problems or Collector(spec.doc.where)
    g = nx.DiGraph()
    g.add_node("input:x", kind="input", name="x", value=Value("tensor", tuple(spec.data_shape)))
    if spec.data.get("labels"):
        g.add_node("input:y", kind="input", name="y", value=Value("labels", ()))
    for name, latent in spec.latents.items():
        g.add_node(f"latent:{name}", kind="latent", name=name, prior=latent.prior)
    for name in spec.networks:
        g.add_node(f"net:{name}", kind="network", name=name)
    for name in spec.params:
        g.add_node(f"param:{name}", kind="param", name=name)
    for name in spec.labels:
        g.add_node(f"label:{name}", kind="label", name=name, value=Value("label"))
    for name, state in spec.states.items():
        g.add_node(f"state:{name}", kind="state", name=name, value=Value("scalar"))
        # the update closes a loop across steps, like an objective's updates edge
        g.add_node(f"update:{name}", kind="update", name=name, section="state", expr=state.update, text=E.to_text(state.update))
        g.add_edge(f"update:{name}", f"state:{name}", rel="updates")
    sections = (("graph", "tensor", spec.graph), ("losses", "loss", spec.losses))
    for section, kind, entries in sections:
        for name, node in entries.items():
            g.add_node(f"{kind}:{name}", kind=kind, name=name, section=section, expr=node, text=E.to_text(node))
    for name, objective in spec.objectives.items():
        g.add_node(f"objective:{name}", kind="objective", name=name, section="objectives", expr=objective.minimize,
                   text=E.to_text(objective.minimize))
    for node_id, attrs in list(g.nodes(data=True)):
        if "expr" in attrs:
            before = len(problems.problems)
            _add_edges(g, spec, node_id, attrs, problems)
            attrs["broken"] = len(problems.problems) > before  # reported; do not pile type errors on it
    for name, objective in spec.objectives.items():
        for net in objective.networks:
            if net in spec.networks:
                g.add_edge(f"objective:{name}", f"net:{net}", rel="updates")
            elif net in spec.latents:
                g.add_edge(f"objective:{name}", f"latent:{net}", rel="updates")
    for attrs in g.nodes.values():
        if "expr" in attrs and attrs["kind"] != "update":
            from_logits = bce_from_logits(spec, attrs["expr"])
            if from_logits:
                attrs["bce_from_logits"] = from_logits
    if not _report_cycles(g, problems):
        _infer_types(g, spec, problems)
        if not problems.problems:  # with broken expressions, missing edges would only echo them
            _check_objectives_reach_networks(g, spec, problems)
            _check_steps_compute(g, spec, problems)
            _check_sample_axis_memory(g, spec, problems)
            grid_problems(spec, g, problems)  # a grid with nothing to show fails here, not after training
    if own:
        problems.raise_if_any()
    return g


def _data_graph(g: nx.DiGraph) -> nx.DiGraph:
    return g.edge_subgraph([(u, v) for u, v, rel in g.edges(data="rel") if rel == "data"]).copy()


def _add_edges(g: nx.DiGraph, spec: Spec, node_id: str, attrs: dict, problems: Collector) -> None:
    path = (attrs["section"], attrs["name"])
    # gradient flows along an edge unless every use of the dependency sits inside detach()
    with_grad = set(_dependencies(_without_detached(attrs["expr"]), spec, attrs["kind"], path, Collector(lambda p: None)))
    for dep in _dependencies(attrs["expr"], spec, attrs["kind"], path, problems):
        g.add_edge(dep, node_id, rel="data", grad=dep in with_grad)


def _without_detached(node):
    """The expression with every detach(...) replaced by a constant."""
    if isinstance(node, E.Call):
        if node.func == "detach":
            return E.Num(0.0)
        return E.Call(node.func, tuple(_without_detached(a) for a in node.args),
                      tuple((k, _without_detached(v)) for k, v in node.kwargs))
    if isinstance(node, E.BinOp):
        return E.BinOp(node.op, _without_detached(node.left), _without_detached(node.right))
    if isinstance(node, E.Neg):
        return E.Neg(_without_detached(node.operand))
    if isinstance(node, E.ListExpr):
        return E.ListExpr(tuple(_without_detached(a) for a in node.items))
    return node


def _dependencies(node, spec: Spec, kind: str, path: tuple, problems: Collector, latent_arg: bool = False) -> list[str]:
    """Node ids an expression reads; reports names that resolve to nothing."""
    if isinstance(node, E.Name):
        dep = _resolve_name(node.id, spec, kind, path, problems, latent_arg)
        return [dep] if dep else []
    deps: list[str] = []
    if isinstance(node, E.Call):
        func = node.func
        net = func.split(".")[0]
        if net in spec.networks or net in spec.raw.get("networks", {}):
            deps.append(f"net:{net}")
            if net not in spec.networks:
                return deps  # its table has errors, reported by validate
        elif func in EXPRESSION_OPS:
            kinds = EXPRESSION_OPS[func]["args"]
            for i, arg in enumerate(node.args):
                if i < len(kinds) and kinds[i] == "network" and isinstance(arg, E.Name) and arg.id in spec.networks:
                    deps.append(f"net:{arg.id}")  # an op that runs a network itself (gp)
                    continue
                is_latent = i < len(kinds) and kinds[i] in ("latent", "distribution")
                deps += _dependencies(arg, spec, kind, path, problems, latent_arg=is_latent)
            return [d for d in deps if d]
        else:
            known = sorted(EXPRESSION_OPS) + sorted(spec.networks)
            problems.add(path, f"unknown op or network {func!r}" + (suggest(func, known) or f"; known: {', '.join(known)}"))
        for arg in node.args:
            deps += _dependencies(arg, spec, kind, path, problems)
        return [d for d in deps if d]
    for child in _children(node):
        deps += _dependencies(child, spec, kind, path, problems)
    return [d for d in deps if d]


def sigmoid_output_call(spec: Spec, node) -> E.Call | None:
    """The network call whose final output `node` is, when that network ends in a sigmoid
    (followed through graph tensor names); None for anything else (a tap, an expression of it)."""
    seen = set()
    while isinstance(node, E.Name) and node.id in spec.graph and node.id not in ("x", "y") and node.id not in seen:
        seen.add(node.id)
        node = spec.graph[node.id]
    if isinstance(node, E.Call):
        net, _, tap = node.func.partition(".")
        info = getattr(spec.networks.get(net), "info", None)
        if info is not None and not tap and info.ends_in_sigmoid:
            return node
    return None


def bce_from_logits(spec: Spec, node) -> list[str]:
    """The predictions of the bce calls in an expression that the compiler computes from their
    network's logits (binary_cross_entropy_with_logits), as text. ops.bce_from_logits says why."""
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, E.Call):
            if n.func == "bce" and n.args and sigmoid_output_call(spec, n.args[0]) is not None:
                found.append(E.to_text(n.args[0]))
            stack.extend(reversed(n.args))
        else:
            stack.extend(reversed(_children(n)))
    return found


def _children(node) -> tuple:
    if isinstance(node, E.BinOp):
        return (node.left, node.right)
    if isinstance(node, E.Neg):
        return (node.operand,)
    if isinstance(node, E.ListExpr):
        return node.items
    return ()


def _resolve_name(name: str, spec: Spec, kind: str, path: tuple, problems: Collector | None, latent_arg: bool = False) -> str | None:
    if latent_arg and name in spec.latents:
        return f"latent:{name}"
    if name == "x":
        return "input:x"
    if name == "y" and spec.data.get("labels"):
        return "input:y"
    if name in spec.graph:
        return f"tensor:{name}"
    if name in spec.params:
        return f"param:{name}"
    if name in spec.labels:
        return f"label:{name}"
    if name in spec.states:
        return f"state:{name}"
    if name in spec.losses and kind in ("loss", "objective", "update"):
        return f"loss:{name}"
    if problems is not None:
        if name in spec.latents:
            problems.add(path, f"{name!r} is a latent (a distribution): draw from it with sample({name})")
        elif name in spec.losses:
            problems.add(path, f"loss {name!r} cannot feed the graph; only losses and objectives read losses")
        elif name in spec.networks:
            problems.add(path, f"{name!r} is a network: call it, e.g. {name}(x)")
        elif name == "y":
            problems.add(path, "labels y are not available: set data.labels: true")
        else:
            known = [*spec.graph, *spec.params, *spec.states, *spec.latents, "x"]
            if kind in ("loss", "objective", "update"):
                known += list(spec.losses)
            problems.add(path, f"undefined name {name!r}{suggest(name, known)}")
    return None


def _report_cycles(g: nx.DiGraph, problems: Collector) -> bool:
    data = _data_graph(g)
    found = False
    for cycle in nx.simple_cycles(data):
        found = True
        first = min(cycle)
        i = cycle.index(first)
        cycle = cycle[i:] + cycle[:i]
        attrs = g.nodes[first]
        names = [g.nodes[n]["name"] for n in cycle] + [attrs["name"]]
        problems.add((attrs.get("section", ""), attrs["name"]), "cycle: " + " -> ".join(names))
    return found


# ---------------------------------------------------------------- type and shape inference

def _infer_types(g: nx.DiGraph, spec: Spec, problems: Collector) -> None:
    data = _data_graph(g)
    data.add_nodes_from(g.nodes)
    for node_id in nx.topological_sort(data):
        attrs = g.nodes[node_id]
        if "expr" not in attrs or attrs["broken"]:
            continue
        path = (attrs["section"], attrs["name"])
        infer = _Infer(spec, g, problems, path)
        try:
            value = infer.value(attrs["expr"])
        except _Unknown:
            continue
        if attrs["kind"] in ("loss", "objective", "update") and value.kind not in ("scalar", "number"):
            problems.add(path + {"objective": ("minimize",), "update": ("update",)}.get(attrs["kind"], ()),
                         f"a loss must be a scalar, but this is a {value.kind} of shape {fmt(value.shape)}; reduce it with mean(...) or sum(...)")
            continue
        attrs["value"] = value
        attrs["bounds"] = infer.bounds(attrs["expr"])


_SECTION_KIND = {"graph": "tensor", "losses": "loss", "objectives": "objective", "state": "update"}


class _Infer:
    def __init__(self, spec: Spec, g: nx.DiGraph, problems: Collector, path: tuple):
        self.spec, self.g, self.problems, self.path = spec, g, problems, path

    def fail(self, message: str, path: tuple | None = None):
        self.problems.add(path or self.path, message)
        raise _Unknown

    def value(self, node) -> Value:
        if isinstance(node, E.Num):
            return Value("number")
        if isinstance(node, E.Name):
            return self.name(node.id)
        if isinstance(node, E.Neg):
            return self.value(node.operand)
        if isinstance(node, E.BinOp):
            return self.binop(node)
        if isinstance(node, E.ListExpr):
            self.fail("a list is not a value here")
        return self.call(node)

    def name(self, name: str) -> Value:
        node_id = _resolve_name(name, self.spec, _SECTION_KIND[self.path[0]], self.path, None)
        if node_id is None or node_id.startswith("param:"):
            return Value("number")
        value = self.g.nodes[node_id].get("value")
        if value is None:
            raise _Unknown  # its own problem has been reported
        return value

    def binop(self, node: E.BinOp) -> Value:
        a, b = self.value(node.left), self.value(node.right)
        kinds = {a.kind, b.kind}
        if "label" in kinds:
            self.fail(f"a named label is a target for bce(p, label), not a value for {node.op!r}")
        if "dist" in kinds or "labels" in kinds:
            self.fail(f"cannot apply {node.op!r} to a {'distribution' if 'dist' in kinds else 'label'}; use rsample(...) or mean_of(...)")
        return self.combined(node.op, a, b)

    def combined(self, what: str, a: Value, b: Value) -> Value:
        """The value of an elementwise combination of two values (+ - * /, min, max)."""
        kinds = {a.kind, b.kind}
        if kinds == {"number"}:
            return Value("number")
        if "tensor" in kinds:
            if a.kind == b.kind == "tensor" and a.shape != b.shape:
                self.fail(f"{what!r} of tensors of shapes {fmt(a.shape)} and {fmt(b.shape)}")
            samples = self.common_samples(what, a, b)
            out = a if a.kind == "tensor" else b
            return Value(out.kind, out.shape, out.producer, samples)
        return Value("scalar")

    def common_samples(self, what: str, *values: Value) -> int:
        """The sample axis a combination keeps: a tensor without one broadcasts over it."""
        counts = {v.samples for v in values if v.samples}
        if len(counts) > 1:
            self.fail(f"{what}: tensors with {' and '.join(map(str, sorted(counts)))} samples per example")
        return counts.pop() if counts else 0

    def call(self, node: E.Call) -> Value:
        net_name, _, tap = node.func.partition(".")
        if net_name in self.spec.networks:
            return self.network_call(node, net_name, tap)
        op = EXPRESSION_OPS[node.func]
        kinds = op["args"]
        least = len(kinds) - op.get("optional", 0)
        if not least <= len(node.args) <= len(kinds) or node.kwargs:
            count = str(len(kinds)) if least == len(kinds) else f"{least} or {len(kinds)}"
            self.fail(f"{node.func} takes {count} argument(s) ({', '.join(kinds)}), got {len(node.args) + len(node.kwargs)}")
        values = [self.argument(arg, kind, node.func, i) for i, (arg, kind) in enumerate(zip(node.args, kinds))]
        if node.func in self.SAMPLE_AWARE:
            return getattr(self, node.func)(node, values)
        if any(v.samples for v in values) and node.func not in ("mean", "sum", "detach", "abs", *ELEMENTWISE):
            self.fail(f"{node.func} reduces over the batch, and this argument has a sample axis (rsample(q, k)); "
                      "reduce that axis first, e.g. logsumexp(...) or mean(...)")
        if node.func in ("sqerr", "mse", "l1") or (node.func in ("bce", "bce_logits") and values[1].kind == "tensor"):
            self.same_shape(node.func, values[0], values[1])
        if node.func == "l2dist":
            self.same_shape(node.func, values[0], values[1])
        if node.func in plugins.OPS and plugins.OPS[node.func].same_shape:
            tensors = [v for v in values if v.kind == "tensor"]
            for other in tensors[1:]:
                self.same_shape(node.func, tensors[0], other)
        if node.func == "bce":
            self.bce_ranges(node, values[0])
        if node.func == "bce_logits":  # any logit is fine; the target still has to be a probability
            if sigmoid_output_call(self.spec, node.args[0]) is not None:
                self.fail(f"bce_logits: takes logits, and network {values[0].producer[0]} ends in a sigmoid; "
                          "use bce(...) on it (computed from its logits anyway), or end the network without the sigmoid")
            self.bce_ranges(node, values[0], prediction=False)
        if node.func == "noisy":
            self.noisy_amount(node.args[1])
        if node.func == "gp":
            conditions = list(self.spec.networks[node.args[0].id].conditions)
            if conditions:  # the penalty calls its critic on the interpolated images alone
                self.fail(f"gp: the critic {node.args[0].id} also reads {', '.join(conditions)} (a conditional "
                          "critic); the gradient penalty calls it on images alone, so give it an unconditional critic")
            for value in values[1:]:
                if value.shape != values[0].shape:
                    self.fail(f"gp: the critic {node.args[0].id} takes {fmt(values[0].shape)}, got {fmt(value.shape)}")
        result = op["result"]
        if result == "same":
            return values[0]
        if result == "tensor":
            if node.func == "sample":
                return Value("tensor", self.spec.latents[node.args[0].id].shape)
            return Value("tensor", values[0].shape)
        if node.func == "kl":
            self.kl_fits(values[0], node.args[1].id)
        return Value("scalar")

    # ops whose value is worked out by a method of their own (they read or make sample axes and dists)
    SAMPLE_AWARE = ("rsample", "mean_of", "onehot", "min", "max", "sum_per_example", "mean_per_example", "logsumexp",
                    "log_prob", "bernoulli", "bernoulli_logits", "categorical", "argmax", "quantize")

    def gaussian(self, func: str, q: Value) -> None:
        if q.family != "gaussian":
            self.fail(f"{func}: needs a Gaussian (a gaussian head's output), got a {q.family} distribution")

    def rsample(self, node: E.Call, values: list) -> Value:
        q = values[0]
        self.gaussian("rsample", q)
        if len(node.args) == 1:
            return Value("tensor", q.shape, None, q.samples)
        if q.samples:
            self.fail("rsample(q, k): q already has a sample axis")
        return Value("tensor", q.shape, None, self.count("rsample", node.args[1]))

    def count(self, func: str, node) -> int:
        try:
            value = E.constant(node, self.spec.params)
        except E.ExprError:
            self.fail(f"{func}: the number of samples must be a number or a param")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            self.fail(f"{func}: the number of samples must be a whole number >= 1, got {value}")
        return int(value)

    def mean_of(self, node: E.Call, values: list) -> Value:
        self.gaussian("mean_of", values[0])
        return Value("tensor", values[0].shape, None, values[0].samples)

    def onehot(self, node: E.Call, values: list) -> Value:
        labels = values[0]
        classes = labels.shape[0] if labels.shape else self.spec.num_classes
        if labels.kind == "number":
            if classes is None:
                self.fail("onehot(K): the dataset has no known number of classes")
            try:
                label = E.constant(node.args[0], self.spec.params)
            except E.ExprError:
                label = None
            if not isinstance(label, float) or label != int(label) or not 0 <= label < classes:
                self.fail(f"onehot(K): K must be a class, a whole number in [0, {classes - 1}], got {label}")
        elif classes is None:
            self.fail("onehot(y): the dataset has no known number of classes")
        return Value("tensor", (classes,), None, labels.samples)

    def min(self, node: E.Call, values: list) -> Value:
        return self.combined(node.func, *values)

    max = min

    def sum_per_example(self, node: E.Call, values: list) -> Value:
        return Value("tensor", (), None, values[0].samples)

    mean_per_example = sum_per_example

    def logsumexp(self, node: E.Call, values: list) -> Value:
        t = values[0]
        if not t.samples:
            self.fail("logsumexp reduces the sample axis of rsample(q, k), and this argument has none")
        return Value("tensor", t.shape)

    def log_prob(self, node: E.Call, values: list) -> Value:
        dist, value = values
        if dist.kind == "latent":
            prior = self.spec.latents[node.args[0].id].prior
            if prior == "codebook":
                self.fail(f"log_prob: latent {node.args[0].id!r} is a codebook, whose codes have no density")
            family = "categorical" if prior == "categorical" else "gaussian"
        else:
            family = dist.family
        if family == "categorical" and dist.kind == "dist":
            if value.kind != "labels":
                self.fail(f"log_prob: a categorical distribution gives the probability of class labels (y, argmax(...)), got a {value.kind}")
            if value.shape and value.shape != dist.shape:
                self.fail(f"log_prob: labels of {value.shape[0]} classes under a categorical of {dist.shape[0]}")
        else:
            if value.kind != "tensor":
                self.fail(f"log_prob: the value must be a tensor, got {value.kind}")
            if value.shape != dist.shape:
                self.same_shape("log_prob", dist, value)
        return Value("tensor", (), None, self.common_samples("log_prob", dist, value))

    def bernoulli(self, node: E.Call, values: list) -> Value:
        p = values[0]
        bounds = self.bounds(node.args[0])
        if bounds is not None and not 0 <= bounds[0] <= bounds[1] <= 1:
            self.fail(f"bernoulli: takes probabilities in [0, 1], and its argument lies in {_shown(bounds)}; "
                      "for logits use bernoulli_logits(...)")
        return Value("dist", p.shape, p.producer, p.samples, "bernoulli")

    def bernoulli_logits(self, node: E.Call, values: list) -> Value:
        return Value("dist", values[0].shape, values[0].producer, values[0].samples, "bernoulli")

    def categorical(self, node: E.Call, values: list) -> Value:
        logp = values[0]
        if len(logp.shape) != 1:
            self.fail(f"categorical: takes one vector of log-probabilities per example, got shape {fmt(logp.shape)}")
        if self.last_activation(logp.producer) == "softmax":
            self.fail(f"categorical: takes log-probabilities, and network {logp.producer[0]} ends in softmax; end it in log_softmax")
        return Value("dist", logp.shape, logp.producer, logp.samples, "categorical")

    def argmax(self, node: E.Call, values: list) -> Value:
        t = values[0]
        if len(t.shape) != 1:
            self.fail(f"argmax: takes one vector per example (scores of each class), got shape {fmt(t.shape)}")
        return Value("labels", t.shape, None, t.samples)

    def quantize(self, node: E.Call, values: list) -> Value:
        z, codes = values
        latent = self.spec.latents[node.args[1].id]
        if latent.prior != "codebook":
            self.fail(f"quantize: latent {latent.name!r} has a {latent.prior} prior; give it prior: codebook(K)")
        if z.samples:
            self.fail("quantize: the argument has a sample axis (rsample(q, k)); quantize codes of single draws")
        if z.shape != latent.shape:
            self.fail(f"quantize: codes of shape {fmt(z.shape)} for codebook latent {latent.name!r} of shape {fmt(latent.shape)}")
        return Value("tensor", z.shape, None)

    def bce_ranges(self, node: E.Call, p: Value, prediction: bool = True) -> None:
        """bce takes probabilities and targets in [0, 1]; torch checks the first only at the first
        step (on a GPU, as a device assert that ends the process), the second never."""
        target, func = node.args[1], node.func
        low, high = self.spec.data.get("range", [0, 1])
        if isinstance(target, E.Name) and target.id == "x" and (low < 0 or high > 1):
            self.fail(f"{func}: the target x lies in data.range [{low:g}, {high:g}], and {func} needs targets in [0, 1]; "
                      "set data.range: [0, 1] or use sqerr / mse")
        if isinstance(target, E.Num) and not 0 <= target.value <= 1:
            self.fail(f"{func}: the target {target.value:g} is outside [0, 1]")
        bounds = self.bounds(node.args[0]) if prediction else None
        if bounds is not None and not 0 <= bounds[0] <= bounds[1] <= 1:
            ending = self.last_activation(p.producer)
            if p.producer and bounds == ACTIVATION_BOUNDS.get(ending, UNBOUNDED):  # the network's output itself
                self.fail(f"bce: argument 1 comes from network {p.producer[0]}, whose output ends in {ending}, not a "
                          "sigmoid; bce needs probabilities in [0, 1] (end the network with ', sigmoid')")
            self.fail(f"bce: argument 1 takes values in {_shown(bounds)}, and bce needs probabilities in [0, 1]")
        bounds = self.bounds(target)
        if bounds is not None and not 0 <= bounds[0] <= bounds[1] <= 1:
            self.fail(f"{func}: the target takes values in {_shown(bounds)}, and {func} needs targets in [0, 1]")

    def bounds(self, node) -> tuple[float, float] | None:
        """The interval an expression's values lie in, as far as the spec decides it (None: not known).

        Reads only what `value` has checked, and reports nothing itself."""
        if isinstance(node, E.Num):
            return (node.value, node.value)
        if isinstance(node, E.Neg):
            inner = self.bounds(node.operand)
            return None if inner is None else (-inner[1], -inner[0])
        if isinstance(node, E.BinOp):
            return _interval(node.op, self.bounds(node.left), self.bounds(node.right))
        if isinstance(node, E.Name):
            return self.name_bounds(node.id)
        if isinstance(node, E.Call):
            return self.call_bounds(node)
        return None

    def name_bounds(self, name: str) -> tuple[float, float] | None:
        node_id = _resolve_name(name, self.spec, _SECTION_KIND[self.path[0]], self.path, None)
        if node_id == "input:x":
            low, high = self.spec.data.get("range", [0, 1])
            return (low, high)
        if node_id is not None and node_id.startswith("param:"):
            value = self.spec.params[name]
            return (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if node_id is not None and node_id.startswith("state:"):
            state = self.spec.states[name]  # clamped to its range after every update
            return (min(state.init, state.low), max(state.init, state.high))
        return self.g.nodes[node_id].get("bounds") if node_id in self.g else None

    def call_bounds(self, node: E.Call) -> tuple[float, float] | None:
        net_name, _, tap = node.func.partition(".")
        if net_name in self.spec.networks:
            info = self.spec.networks[net_name].info
            row = info.taps.get(tap) if tap else len(info.rows) - 1
            if row is None or info.rows[row].row["op"] == "gaussian":
                return None
            return ACTIVATION_BOUNDS.get(self.last_activation((net_name, row)), UNBOUNDED)
        if node.func in ("detach", "mean", "mean_per_example"):
            return self.bounds(node.args[0])
        if node.func in ("min", "max"):
            a, b = self.bounds(node.args[0]), self.bounds(node.args[1])
            if a is None or b is None:
                return None
            pick = min if node.func == "min" else max
            return (pick(a[0], b[0]), pick(a[1], b[1]))
        if node.func == "clamp":
            inner, low, high = (self.bounds(a) for a in node.args)
            if low is None or high is None or low[0] != low[1] or high[0] != high[1]:
                return None
            inner = inner or UNBOUNDED
            return (min(max(inner[0], low[0]), high[0]), max(min(inner[1], high[0]), low[0]))
        if node.func in ("relu", "softplus", "exp", "square", "sqrt"):  # non-negative whatever goes in
            return (0.0, float("inf"))
        if node.func == "abs":
            inner = self.bounds(node.args[0])
            if inner is None:
                return None
            low, high = inner
            return (0.0 if low <= 0 <= high else min(abs(low), abs(high)), max(abs(low), abs(high)))
        if node.func == "noisy":  # a mix of its input and uniform noise on [0, 1]
            inner = self.bounds(node.args[0])
            return None if inner is None else (min(inner[0], 0.0), max(inner[1], 1.0))
        if node.func == "onehot":
            return (0.0, 1.0)
        if node.func == "sample":
            latent = self.spec.latents[node.args[0].id]
            if latent.prior == "uniform" and len(latent.prior_args) == 2:
                return tuple(float(v) for v in latent.prior_args)
            return (0.0, 1.0) if latent.prior == "categorical" else UNBOUNDED
        return None

    # rows that move or pick values without changing their range
    _RANGE_KEEPING = ("reshape", "flatten", "crop", "identity", "dropout", "maxpool", "avgpool", "upsample")

    def last_activation(self, producer: tuple | None) -> str | None:
        """The activation (or 'no activation') that last shaped a network row's values, or None
        when the value is not a network's row (an expression of several: not checked)."""
        if producer is None:
            return None
        net_name, row = producer
        rows = self.spec.networks[net_name].info.rows
        while row > 0 and rows[row].row["op"] in self._RANGE_KEEPING:
            row -= 1
        entry = rows[row].row
        while entry["op"] == "block" and not entry.get("act") and not entry.get("skip"):
            entry = entry["layers"][-1]  # a block without a skip ends as its last row does
        if entry.get("act"):
            return entry["act"]
        return entry["op"] if entry["op"] in ACTIVATIONS else "no activation"

    def noisy_amount(self, amount) -> None:
        try:
            value = E.constant(amount, self.spec.params)
        except E.ExprError:
            return  # not a constant: ops.noisy checks it at every step
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            self.fail(f"noisy: the amount must be in [0, 1], got {value}")

    def argument(self, arg, kind: str, func: str, i: int) -> Value | None:
        if kind == "network":
            if not isinstance(arg, E.Name) or arg.id not in self.spec.networks:
                self.fail(f"{func}: argument {i + 1} must name a network (networks: {', '.join(self.spec.networks)})")
            return Value("network", tuple(self.spec.networks[arg.id].input))
        if kind == "latent":
            if not isinstance(arg, E.Name) or arg.id not in self.spec.latents:
                known = ", ".join(self.spec.latents) or "none declared"
                self.fail(f"{func}: argument {i + 1} must name a latent (latents: {known})")
            return Value("latent", self.spec.latents[arg.id].shape)
        if kind == "distribution" and isinstance(arg, E.Name) and arg.id in self.spec.latents:
            return Value("latent", self.spec.latents[arg.id].shape)
        value = self.value(arg)
        allowed = {"dist": ("dist",), "tensor": ("tensor",), "target": ("tensor", "number", "label"),
                   "labels": ("labels", "number") if func == "onehot" else ("labels",),
                   "any": ("tensor", "scalar", "number"), "number": ("number",), "count": ("number",),
                   "distribution": ("dist",), "value": ("tensor", "labels")}[kind]
        if value.kind not in allowed:
            hint = "; draw from it with rsample(...)" if value.kind == "dist" else ""
            self.fail(f"{func}: argument {i + 1} must be a {' or '.join(allowed)}, got a {value.kind}{hint}")
        return value

    def network_call(self, node: E.Call, net_name: str, tap: str) -> Value:
        net = self.spec.networks[net_name]
        expected = [("input", net.input)] + [(c, shape) for c, (shape, _) in net.conditions.items()]
        if len(node.args) != len(expected) or node.kwargs:
            takes = "one input" if len(expected) == 1 else f"{len(expected)} inputs ({', '.join(n for n, _ in expected)})"
            self.fail(f"network {net_name} takes {takes}, got {len(node.args) + len(node.kwargs)}")
        arguments = [self.value(arg_node) for arg_node in node.args]
        for value, (what, shape) in zip(arguments, expected):
            self.network_argument(net_name, what, shape, value)
        # a network maps each of k draws per example as one more example (compiler flattens the axis)
        samples = self.common_samples(f"network {net_name}", *arguments)
        info = net.info
        if tap:
            if tap not in info.taps:
                self.fail(f"network {net_name} has no tap {tap!r}" + (f"; its taps: {', '.join(info.taps)}" if info.taps else
                                                                       "; name a row with 'as NAME'"))
            row = info.taps[tap]
            return Value("dist" if info.rows[row].row["op"] == "gaussian" else "tensor", info.rows[row].out_shape, (net_name, row),
                         samples)
        return Value(info.kind, info.output, (net_name, len(info.rows) - 1), samples)

    def network_argument(self, net_name: str, what: str, shape: tuple, arg: Value) -> None:
        label = f"{net_name}'s {what}" if what != "input" else f"{net_name}'s input"
        if arg.kind != "tensor":
            self.fail((f"{label}" if what != "input" else f"{net_name}: its input") + f" must be a tensor, got a {arg.kind}" + ("; draw from it with rsample(...)" if arg.kind == "dist" else ""))
        if arg.shape != shape:
            if arg.producer:
                producer, row = arg.producer
                self.fail(f"output {fmt(arg.shape)} does not fit {label} {fmt(shape)} ({'.'.join(self.path)})",
                          ("networks", producer, "layers", row))
            self.fail(f"{label} is {fmt(shape)}, got {fmt(arg.shape)}" if what != "input"
                      else f"{net_name} expects input {fmt(shape)}, got {fmt(arg.shape)}")

    def same_shape(self, func: str, a: Value, b: Value) -> None:
        if a.shape == b.shape:
            return
        for mine, other in ((a, b), (b, a)):
            if mine.producer and not other.producer:
                producer, row = mine.producer
                self.fail(f"output {fmt(mine.shape)} does not match {fmt(other.shape)} in {func} ({'.'.join(self.path)})",
                          ("networks", producer, "layers", row))
        self.fail(f"{func} of tensors of shapes {fmt(a.shape)} and {fmt(b.shape)}")

    def kl_fits(self, q: Value, latent: str) -> None:
        self.gaussian("kl", q)
        shape = self.spec.latents[latent].shape
        if q.shape != shape:
            self.fail(f"kl: the posterior has shape {fmt(q.shape)} but latent {latent!r} has {fmt(shape)}")
        prior = self.spec.latents[latent].prior
        if prior not in ("normal", "realnvp") and prior not in plugins.PRIORS:  # a plugin's: Monte Carlo, by its log_prob
            self.fail(f"kl: needs a normal or realnvp prior; latent {latent!r} is {prior}")


UNBOUNDED = (-math.inf, math.inf)
ELEMENTWISE = ("relu", "softplus", "exp", "log", "square", "sqrt", "clamp")  # they broadcast over a sample axis
# Where an activation puts its values (the rest, and no activation, can give any real number).
ACTIVATION_BOUNDS = {"sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu": (0.0, math.inf),
                     "softplus": (0.0, math.inf)}


def _interval(op: str, a: tuple | None, b: tuple | None) -> tuple[float, float] | None:
    """Interval arithmetic for + - * /; None where an operand is not known or a divisor can be 0."""
    if a is None or b is None:
        return None
    if op == "+":
        ends = [a[0] + b[0], a[1] + b[1]]
    elif op == "-":
        ends = [a[0] - b[1], a[1] - b[0]]
    elif op == "*":
        ends = [x * y for x in a for y in b]
    elif op == "/" and not b[0] <= 0 <= b[1]:
        ends = [x / y for x in a for y in b]
    else:
        return None
    return None if any(math.isnan(v) for v in ends) else (min(ends), max(ends))  # nan: 0 times infinity


def _shown(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:g}, {bounds[1]:g}]"


def value_of(spec: Spec, node, kind: str, g: nx.DiGraph | None = None) -> Value | None:
    """What a (validated) expression of a `kind` node (tensor, loss, objective, update) yields: the
    compiler asks for the shapes that per-example reductions and densities sum over, and whether a
    network call sees a sample axis. None if it cannot be worked out."""
    section = next(section for section, own in _SECTION_KIND.items() if own == kind)
    infer = _Infer(spec, spec.graph_nx if g is None else g, Collector(lambda path: None), (section, ""))
    try:
        return infer.value(node)
    except _Unknown:
        return None


def _check_sample_axis_memory(g: nx.DiGraph, spec: Spec, problems: Collector) -> None:
    """validate's memory estimate counts each network call at the batch size; a call on rsample(q, k)'s
    draws runs k times as many examples. Refuse the step it would not fit, at the expression."""
    from genspec.lang.validate import DEFAULT_MEMORY_BUDGET_GIB, step_memory

    if not any(getattr(attrs.get("value"), "samples", 0) > 1 for attrs in g.nodes.values()):
        return  # no expression draws several samples: validate's estimate stands
    budget = float(spec.train.get("memory_budget", DEFAULT_MEMORY_BUDGET_GIB)) * 2 ** 30
    batch = int(spec.train.get("batch_size", 1))
    extra, where = 0.0, None
    for attrs in g.nodes.values():
        if "expr" not in attrs or attrs["kind"] == "update":
            continue
        for call in _network_calls(spec, attrs["expr"]):
            value = value_of(spec, call, attrs["kind"], g)
            if value is None or value.samples <= 1:
                continue
            net = spec.networks[call.func.partition(".")[0]]
            per_call = 2 * 4 * batch * sum(math.prod(row.out_shape) for row in net.info.walk() if row.out_shape)
            extra += (value.samples - 1) * per_call
            where = where or ((attrs["section"], attrs["name"]), call, value.samples)
    if where is None:
        return
    total = sum(n["weights"] + n["activations"] for n in step_memory(spec.raw, spec.train, spec.networks).values()) + extra
    if total > budget:
        path, call, k = where
        problems.add(path, f"{E.to_text(call)} runs on {k:,} draws per example ({k:,} x batch {batch}): one training step "
                           f"needs about {total / 2 ** 30:,.1f} GiB by genspec's estimate, above train.memory_budget "
                           f"({budget / 2 ** 30:g} GiB); use fewer samples or a smaller batch")


def _network_calls(spec: Spec, node) -> list[E.Call]:
    """The network calls in an expression (outermost first)."""
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, E.Call):
            if n.func.partition(".")[0] in spec.networks:
                found.append(n)
            stack.extend(n.args)
        else:
            stack.extend(_children(n))
    return found


def _check_objectives_reach_networks(g: nx.DiGraph, spec: Spec, problems: Collector) -> None:
    data = _data_graph(g)
    grad = g.edge_subgraph([(u, v) for u, v, a in g.edges(data=True) if a["rel"] == "data" and a.get("grad")]).copy()
    for name, objective in spec.objectives.items():
        node = f"objective:{name}"
        reached = nx.ancestors(data, node) if node in data else set()
        with_gradient = nx.ancestors(grad, node) if node in grad else set()
        for net in objective.networks:
            if net not in spec.networks and net not in spec.latents:
                continue
            kind = "net" if net in spec.networks else "latent"
            if f"{kind}:{net}" not in reached:
                problems.add(("objectives", name, "minimize"),
                             f"the loss does not depend on network {net!r}, so this objective cannot train it")
            elif f"{kind}:{net}" not in with_gradient:
                problems.add(("objectives", name, "minimize"),
                             f"the loss reads network {net!r} only through detach(), so this objective cannot train it")


def _check_steps_compute(g: nx.DiGraph, spec: Spec, problems: Collector) -> None:
    """Every state is updated, and every traced name recorded, by at least one phase."""
    plans = [set(plan(g, phase.update)) for phase in spec.phases]
    for name in spec.states:
        if not any(step_extras(g, have, f"update:{name}") is not None for have in plans):
            problems.add(("state", name, "update"), "no training phase computes what this update reads; "
                         "it may read losses of the objectives that one phase updates")
    for i, name in enumerate(spec.train.get("trace", [])):
        if name in spec.losses and not any(step_extras(g, have, f"loss:{name}") is not None for have in plans):
            problems.add(("train", "trace", i), f"no training phase computes the tensors loss {name!r} reads")


def step_extras(g: nx.DiGraph, have: set, target: str) -> list | None:
    """The extra loss nodes a phase that computes `have` must add to evaluate `target` (a state's
    update or a traced loss), or None when it would need a tensor the phase does not compute:
    a trace or a state update never adds network passes to a step."""
    needed = compute_order(g, [target])
    extra = [n for n in needed if n not in have and n != target]
    if any(not n.startswith("loss:") for n in extra):
        return None
    return extra + ([target] if target.startswith("loss:") and target not in have else [])


# ---------------------------------------------------------------- plans and renderings

def plan(g: nx.DiGraph, objective_names: list[str]) -> list[str]:
    """Tensor and loss node ids an update of these objectives needs, in the order to compute them."""
    return compute_order(g, [f"objective:{name}" for name in objective_names])


def data_ancestors(g: nx.DiGraph, node: str) -> set[str]:
    """What a node's value is computed from (data edges only; updates edges close the training loop)."""
    data = _data_graph(g)
    return nx.ancestors(data, node) if node in data else set()


def compute_order(g: nx.DiGraph, targets: list[str]) -> list[str]:
    """The tensor and loss nodes that `targets` (and the targets themselves) need, in data-flow
    order: only what is asked for is computed (networkx ancestors over data edges)."""
    data = _data_graph(g)
    data.add_nodes_from(targets)
    needed: set[str] = set(targets)
    for node in targets:
        needed |= nx.ancestors(data, node)
    return [n for n in nx.topological_sort(data.subgraph(needed)) if g.nodes[n]["kind"] in ("tensor", "loss")]


def to_text(g: nx.DiGraph) -> str:
    lines = []
    for node_id in nx.topological_sort(_with_all_nodes(g)):
        attrs = g.nodes[node_id]
        reads = sorted(u for u, _, rel in g.in_edges(node_id, data="rel") if rel == "data")
        value = attrs.get("value")
        typ = f"  [{value.kind}" + (f" {fmt(value.shape)}]" if value.kind in ("tensor", "dist") else "]") if value and value.kind != "number" else ""
        if value is not None and value.samples:
            typ += f" x {value.samples} samples"
        detail = f" = {attrs['text']}" if "text" in attrs else ""
        updates = [v for _, v, rel in g.out_edges(node_id, data="rel") if rel == "updates"]
        logits = attrs.get("bce_from_logits")
        lines.append(f"{node_id}{detail}{typ}" + (f"  -> updates {', '.join(updates)}" if updates else "")
                     + (f"  <- {', '.join(reads)}" if reads and not detail else "")
                     + (f"  (bce from logits: {', '.join(logits)})" if logits else ""))
    return "\n".join(lines)


def _with_all_nodes(g: nx.DiGraph) -> nx.DiGraph:
    data = _data_graph(g)
    data.add_nodes_from(g.nodes)
    return data


def to_dot(g: nx.DiGraph) -> str:
    shapes = {"input": "box", "latent": "ellipse", "network": "box3d", "tensor": "oval", "loss": "diamond",
              "objective": "hexagon", "param": "plaintext"}
    lines = ["digraph genspec {", "  rankdir=LR;"]
    for node_id, attrs in g.nodes(data=True):
        label = attrs["name"] + (f"\\n{attrs['text']}" if "text" in attrs else "")
        label = label.replace('"', "'")
        lines.append(f'  "{node_id}" [label="{label}", shape={shapes.get(attrs["kind"], "oval")}];')
    for u, v, rel in g.edges(data="rel"):
        style = ' [style=dashed, label="updates"]' if rel == "updates" else ""
        lines.append(f'  "{u}" -> "{v}"{style};')
    lines.append("}")
    return "\n".join(lines)


def to_json(g: nx.DiGraph) -> dict:
    nodes = []
    for node_id, attrs in g.nodes(data=True):
        entry = {"id": node_id, "kind": attrs["kind"], "name": attrs["name"]}
        if "text" in attrs:
            entry["expr"] = attrs["text"]
        if "bce_from_logits" in attrs:
            entry["bce_from_logits"] = attrs["bce_from_logits"]
        value = attrs.get("value")
        if value is not None:
            entry["value"] = {"kind": value.kind, "shape": list(value.shape)}
            if value.samples:
                entry["value"]["samples"] = value.samples
        nodes.append(entry)
    edges = [{"from": u, "to": v, "rel": rel} for u, v, rel in g.edges(data="rel")]
    return {"nodes": nodes, "edges": edges}
