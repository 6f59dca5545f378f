"""Stage 3: check a resolved document against the JSON Schema, then across fields.

The schema (schemas/genspec.schema.json) catches unknown keys, wrong types and bad enum
values; the cross-field pass parses rows and expressions, infers layer shapes and builds the
`Spec` the later stages use. All problems are gathered and raised together as a SpecError.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from functools import lru_cache
from pathlib import Path

from genspec.lang import expr as E
from genspec.errors import Collector, SpecError, suggest
from genspec.lang import plugins
from genspec.lang.loader import Document, project_root
from genspec.lang.blocks import UnsoundBlock, expand, read_blocks, spectrally_normalised
from genspec.lang.registry import (DATASET_CLASSES, DATASET_SIZES, FILE_DATASETS, DATASET_SHAPES, INITS, OPTIMIZERS,
                                   PRIOR_KWARGS, PRIORS)
from genspec.lang.rows import RowError, parse_row
from genspec.lang.shapes import ShapeError, infer_network
from genspec.lang.spec import Latent, Network, Objective, Phase, Spec, State

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "genspec.schema.json"

TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 64, "seed": 0, "device": "auto", "checkpoint_every": 1, "log_every": 10,
                  "precision": "auto", "channels_last": "auto", "fused": "auto", "compile": False, "cuda_graphs": "auto",
                  "loader": "auto", "workers": "auto", "tracking": ("tensorboard",)}
EVALUATE_DEFAULTS = {"grid_size": 8, "interpolation_steps": 8, "batch_size": 256}
BALANCE_DEFAULTS = {"every": 1, "samples": 1000, "features": "pixels", "shrinkage": 0.1}
COLLAPSE_DEFAULTS = {"fall": 0.5, "window": 10}
DATA_DEFAULTS = {"range": [0, 1], "pad": 0, "labels": False, "download": False}


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(doc: Document) -> Spec:
    """Schema, then cross-field checks. Returns the Spec or raises SpecError with every problem."""
    problems = Collector(doc.where)
    loaded = plugins.load(doc, problems)  # first: the names they register widen the schema
    problems.raise_if_any()
    schema_problems(doc, problems)
    problems.raise_if_any()
    spec = build_spec(doc, problems)
    problems.raise_if_any()
    spec.plugins = loaded
    return spec


# ---------------------------------------------------------------- JSON Schema

def schema_problems(doc: Document, problems: Collector) -> None:
    validator = _validator_class()(plugins.extend_schema(schema()))
    if not isinstance(doc.data, dict):
        problems.add((), "a spec is a mapping of sections (genspec, name, data, networks, ...)")
        return
    misspelt = set()
    for error in validator.iter_errors(doc.data):
        error = _deepest(error)
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties":
            known = sorted(error.schema.get("properties", {}))
            for key in _unexpected_keys(error):
                hint = difflib.get_close_matches(str(key), known, n=1)
                where = f"; did you mean {hint[0]!r}?" if hint else (f"; known keys: {', '.join(known)}" if known else "")
                if any(c in str(key) for c in "()=["):  # adam(lr, beta=0.5) unquoted in { }: YAML split it at the comma
                    where += ('; inside { } a value with commas of its own needs quotes, '
                              'e.g. optimizer: "adam(lr, betas=[0.5, 0.999])"')
                problems.add(path + (key,), f"unknown key {key!r}{where}")
        elif error.validator == "required" and (message := _misspelt_network(doc.data, path)):
            if path not in misspelt:  # one message for its missing input and layers
                misspelt.add(path)
                problems.add(path, message)
        else:
            problems.add(path, _message(error))


@lru_cache(maxsize=1)
def _validator_class():
    """Draft 2020-12, except that 8.0 is not an integer (JSON Schema says it is; a layer size is not)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(base, type_checker=checker)


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _fits_type(instance, subschema: dict) -> bool:
    """Whether an instance is of the kind a oneOf alternative describes (its type, const or enum)."""
    if "const" in subschema:
        return instance == subschema["const"]
    if "enum" in subschema:
        return instance in subschema["enum"]
    wanted = subschema.get("type")
    if wanted is None:
        return True
    if wanted in ("integer", "number"):
        ok = isinstance(instance, (int, float)) and not isinstance(instance, bool)
        return ok and (wanted == "number" or isinstance(instance, int))
    return isinstance(instance, _JSON_TYPES[wanted])


def _deepest(error):
    """For oneOf/anyOf, follow the alternative of the instance's own kind: a mapping row with a
    bad key should hear about the key, not that it "is not a string"."""
    while error.validator in ("oneOf", "anyOf") and error.context:
        alternatives = error.schema[error.validator]
        fitting = [i for i, sub in enumerate(alternatives) if _fits_type(error.instance, _resolve_ref(sub))]
        if len(fitting) != 1:
            break
        inner = [e for e in error.context if e.relative_schema_path and e.relative_schema_path[0] == fitting[0]]
        if not inner:
            break
        error = min(inner, key=lambda e: (len(e.relative_schema_path), e.validator == "type"))
    return error


def _resolve_ref(sub: dict) -> dict:
    ref = sub.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return schema()["$defs"][ref.split("/")[-1]]
    return sub


def _type_mismatch_only(error) -> bool:
    return not any(_fits_type(error.instance, _resolve_ref(sub)) for sub in error.schema.get("oneOf", [{}]))


def _kind_name(subschema: dict) -> str:
    if "const" in subschema:
        return json.dumps(subschema["const"])
    if "enum" in subschema:
        return "one of " + ", ".join(json.dumps(x) for x in subschema["enum"])
    return {"object": "mapping", "array": "list"}.get(subschema.get("type"), subschema.get("type", "value"))


def _unexpected_keys(error) -> list:
    allowed = set(error.schema.get("properties", {}))
    return [k for k in error.instance if k not in allowed]


def _message(error) -> str:
    v, inst = error.validator, error.instance
    if v == "required":
        return f"missing required key {error.message.split(' is a required')[0]}"
    if v == "type" or (v == "oneOf" and _type_mismatch_only(error)):
        wanted = error.validator_value if v == "type" else " or ".join(
            sorted({_kind_name(_resolve_ref(sub)) for sub in error.schema["oneOf"]}))
        return f"expected {wanted}, got {_kind(inst)}" + ("" if inst is None else f" {_short(inst)}")
    if v == "enum":
        return f"{_short(inst)} is not one of {', '.join(json.dumps(x) for x in error.validator_value)}"
    if v == "const":
        return f"must be {json.dumps(error.validator_value)}, got {_short(inst)}"
    if v == "pattern":
        return f"{_short(inst)} is not allowed here" + (f" ({error.schema['description']})" if "description" in error.schema else "")
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        return f"{_short(inst)} is out of range ({v} {error.validator_value})"
    if v in ("minItems", "maxItems", "minProperties"):
        return f"{v} is {error.validator_value}"
    if v == "uniqueItems":
        return "items must be unique"
    return error.message


def _kind(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _misspelt_network(data: dict, path: tuple) -> str | None:
    """A network entry without its table whose name is close to one that has one: most likely a
    misspelt name in --set or a patch (networks.encc.init=...), which made a new, empty network."""
    if len(path) != 2 or path[0] != "networks" or not isinstance(data.get("networks"), dict):
        return None
    entry = data["networks"].get(path[1])
    if not isinstance(entry, dict) or "layers" in entry or "input" in entry:
        return None  # a network of its own, missing part of its table
    tables = [name for name, net in data["networks"].items() if isinstance(net, dict) and "layers" in net]
    close = difflib.get_close_matches(str(path[1]), tables, n=1)
    if not close:
        return None
    return f"no network named {path[1]!r}; did you mean {close[0]!r}? (a new network needs its input and layers)"


def study_problems(doc: Document) -> None:
    """The sections only a sweep file has (repeats, study) checked against their schema and factors."""
    problems = Collector(doc.where)
    for key in ("repeats", "study"):
        if key in doc.data:
            for error in _validator_class()(schema()["properties"][key]).iter_errors(doc.data[key]):
                error = _deepest(error)
                path = (key, *error.absolute_path)
                if error.validator == "additionalProperties":
                    for extra in _unexpected_keys(error):
                        problems.add(path + (extra,), f"unknown key {extra!r}; known keys: {', '.join(sorted(error.schema['properties']))}")
                else:
                    problems.add(path, _message(error))
    factors = list(doc.data.get("sweep") or {})
    study = doc.data.get("study") if isinstance(doc.data.get("study"), dict) else {}
    repeats = doc.data.get("repeats") if isinstance(doc.data.get("repeats"), int) else 1
    if "study" in doc.data and not factors and repeats <= 1:
        problems.add(("study",), "a study section lays out the tables of a sweep or of repeats, and this spec has "
                                 "neither: add a sweep section or repeats: 2 (or more)")
    for side in ("rows", "columns"):
        for i, name in enumerate(study.get(side) or []):
            if name not in factors:
                problems.add(("study", side, i), f"{name!r} is not a factor of the sweep ({', '.join(factors)})")
    problems.raise_if_any()


# Numbers metrics.json holds at its top level, and the sections whose keys a table may name.
TABLE_METRICS = ("time_per_epoch_s", "eval_time_s", "test_accuracy", "trainable", "frozen", "epochs", "seed")
TABLE_SECTIONS = ("test", "best_test", "best_test_epoch", "train_last_epoch", "fidelity", "real", "balance", "params", "data", "collapse")


def table_metric_problems(doc: Document, specs: list[Spec]) -> None:
    """study.tables[].metric against what the runs' metrics.json will hold: a misspelt metric
    would otherwise give a table of empty cells after the whole study has trained."""
    study = doc.data.get("study") if isinstance(doc.data, dict) else None
    tables = study.get("tables") if isinstance(study, dict) else None
    if not tables or not specs:
        return
    problems = Collector(doc.where)
    for i, table in enumerate(tables):
        metric = table.get("metric") if isinstance(table, dict) else None
        if isinstance(metric, str):
            message = _table_metric_problem(metric, specs)
            if message:
                problems.add(("study", "tables", i, "metric"), message)
    problems.raise_if_any()


def _table_metric_problem(metric: str, specs: list[Spec]) -> str | None:
    section, _, key = metric.partition(".")
    if not key:
        if metric == "test_accuracy" and not all(spec.evaluate.get("accuracy") for spec in specs):
            return "test_accuracy is measured only with evaluate.accuracy set"
        if metric in TABLE_METRICS:
            return None
        known = [*TABLE_METRICS, *(f"{s}.NAME" for s in TABLE_SECTIONS)]
        return f"metrics.json has no {metric!r}; a table reads one of {', '.join(known)}" + suggest(metric, TABLE_METRICS)
    if section not in TABLE_SECTIONS:
        return f"metrics.json has no section {section!r}; sections: {', '.join(TABLE_SECTIONS)}" + suggest(section, TABLE_SECTIONS)
    if section in ("test", "best_test", "best_test_epoch"):
        for spec in specs:
            evaluated = spec.evaluate.get("losses", list(spec.losses))
            if key not in evaluated:
                return f"the runs evaluate no test loss {key!r} (evaluate.losses: {', '.join(evaluated)})" + suggest(key, evaluated)
    return None


# ---------------------------------------------------------------- cross-field checks

def build_spec(doc: Document, problems: Collector) -> Spec:
    raw = doc.data
    params = dict(raw.get("params", {}))
    data = {**DATA_DEFAULTS, **raw["data"]}
    data_shape, num_classes = _data_shape(data, problems)
    latents = {name: _latent(name, entry, params, problems) for name, entry in raw.get("latent", {}).items()}
    blocks = read_blocks(raw.get("blocks"), problems)
    networks = {}
    for name, entry in raw["networks"].items():
        net = _network(name, entry, data_shape, latents, params, problems, num_classes, blocks)
        if net is not None:
            networks[name] = net
    graph = _expressions("graph", raw.get("graph", {}), problems)
    losses = _expressions("losses", raw.get("losses", {}), problems)
    objectives = _objectives(raw["objectives"], networks, set(raw["networks"]), latents, params, problems)
    train = {**TRAIN_DEFAULTS, **raw.get("train", {})}
    phases = _phases(train, objectives, problems)
    _check_phases_train_each_network_once(raw["objectives"], objectives, latents, train, phases, problems)
    evaluate = {**EVALUATE_DEFAULTS, **raw.get("evaluate", {})}
    if "balance" in train:
        train["balance"] = {**BALANCE_DEFAULTS, **train["balance"]}
    if "collapse" in evaluate:
        evaluate["collapse"] = {**COLLAPSE_DEFAULTS, **evaluate["collapse"]}
    _resolve_run_paths(evaluate, train, doc.file)
    for i, name in enumerate(evaluate.get("losses", [])):
        if name not in raw.get("losses", {}):
            problems.add(("evaluate", "losses", i), f"no loss named {name!r}")
    grids = evaluate.get("grids", [])
    for kind, tensor in (grids.items() if isinstance(grids, dict) else []):
        if tensor not in raw.get("graph", {}):
            problems.add(("evaluate", "grids", kind), f"no graph tensor named {tensor!r}" + suggest(tensor, raw.get("graph", {})))
    if evaluate.get("accuracy") and evaluate["accuracy"] not in raw.get("graph", {}):
        problems.add(("evaluate", "accuracy"), f"no graph tensor named {evaluate['accuracy']!r}")
    labels = {}
    for name, entry in raw.get("labels", {}).items():
        labels[name] = {"value": float(entry["value"]), "swap": float(entry.get("swap", 0.0)),
                        "other": float(entry.get("other", 1.0 - entry["value"]))}
        if entry.get("swap") and "other" not in entry:
            problems.add(("labels", name), "a label with swap needs `other`, the value it is swapped to")
    states = _states(raw.get("state", {}), params, problems)
    _check_training_extras(raw, train, evaluate, latents, states, problems)
    _check_batch_norm_has_two(train, networks, problems)
    _check_memory(raw, train, networks, problems)
    _check_names_do_not_clash(raw, problems)
    return Spec(raw["name"], doc, params, data, data_shape, num_classes, latents, networks, graph, losses,
                objectives, train, phases, evaluate, labels, states)


def run_path(path: str, spec_file: str) -> str:
    """A run folder a spec names (a classifier extractor): as written when it exists from here or
    is absolute, else in the spec's project when it is there, so that `genspec run` started in
    another folder finds reports/mnist_classifier. Otherwise as written, for the message."""
    written = Path(path).expanduser()
    if written.is_absolute() or written.exists():
        return path
    root = project_root(spec_file)
    return str(root / written) if root is not None and (root / written).exists() else path


def _resolve_run_paths(evaluate: dict, train: dict, spec_file: str) -> None:
    """Resolve the run folders named by evaluate.extractor and train.balance.features (the
    resolved document, written into run folders, keeps them as written)."""
    extractor = evaluate.get("extractor")
    if isinstance(extractor, dict) and isinstance(extractor.get("classifier"), str):
        evaluate["extractor"] = {**extractor, "classifier": run_path(extractor["classifier"], spec_file)}
    features = train.get("balance", {}).get("features")
    if isinstance(features, dict) and isinstance(features.get("classifier"), str):
        train["balance"] = {**train["balance"], "features": {**features, "classifier": run_path(features["classifier"], spec_file)}}


DEFAULT_MEMORY_BUDGET_GIB = 64


def step_memory(raw: dict, train: dict, networks: dict) -> dict:
    """genspec's estimate of one training step's memory, in bytes: float32 weights, gradients and
    Adam's two moments of every parameter (16 bytes each), and each network's activations at the
    batch size, kept for the backward pass and matched by their gradients, once per call of the
    network in the graph and losses. An estimate to refuse the impossible before anything is
    allocated, not a measurement (autocast halves the activations, the allocator adds slack)."""
    text = " ".join(str(v) for section in ("graph", "losses") for v in (raw.get(section) or {}).values())
    batch = int(train.get("batch_size", 1))
    per_network = {}
    for name, net in networks.items():
        params = net.info.trainable + net.info.frozen
        values = sum(math.prod(row.out_shape) for row in net.info.walk() if row.out_shape)
        calls = max(1, len(re.findall(rf"\b{re.escape(name)}\s*[(.]", text)))
        per_network[name] = {"params": params, "weights": 16 * params, "activations": 2 * 4 * values * batch * calls}
    return per_network


def _check_memory(raw: dict, train: dict, networks: dict, problems: Collector) -> None:
    """A network too large for any machine (`fc 100000000` is 12.9 G parameters) is refused here,
    with the estimate, instead of dying in the allocator after the data has loaded."""
    budget = float(train.get("memory_budget", DEFAULT_MEMORY_BUDGET_GIB))
    estimate = step_memory(raw, train, networks)
    total = sum(n["weights"] + n["activations"] for n in estimate.values())
    if total <= budget * 2 ** 30:
        return
    biggest = max(estimate, key=lambda n: estimate[n]["weights"] + estimate[n]["activations"])
    big = estimate[biggest]
    gib = 2 ** 30
    problems.add(("networks", biggest), f"one training step needs about {total / gib:,.1f} GiB by genspec's estimate, above "
                        f"train.memory_budget ({budget:g} GiB); networks.{biggest} alone has {big['params']:,} parameters "
                        f"({big['weights'] / gib:,.1f} GiB with gradients and Adam's moments) and "
                        f"{big['activations'] / gib:,.1f} GiB of activations at batch {train.get('batch_size')}. "
                        "On a machine that has the memory: --set train.memory_budget=GIB")


def _check_batch_norm_has_two(train: dict, networks: dict, problems: Collector) -> None:
    """Batch norm in training mode normalises over the batch: a batch of one has no spread."""
    name = batch_norm_network(networks) if train["batch_size"] == 1 else None
    if name:
        problems.add(("train", "batch_size"), f"batch norm (in networks.{name}) needs at least 2 examples a batch; "
                                              "use a larger train.batch_size or another norm")


def batch_norm_network(networks: dict) -> str | None:
    """The first network with a batch-norm row, if any."""
    return next((name for name, net in networks.items() if any("bn" in (r.row.get("norm"), r.row["op"]) for r in net.info.walk())),
                None)


def _states(entries: dict, params: dict, problems: Collector) -> dict[str, State]:
    out = {}
    for name, entry in entries.items():
        path = ("state", name)
        low, high = entry.get("range", [-math.inf, math.inf])
        if low > high:
            problems.add(path + ("range",), f"range [{low}, {high}]: low is above high")
        init = float(entry.get("init", 0.0))
        if not low <= init <= high:
            problems.add(path + ("init",), f"init {init:g} is outside the range [{low:g}, {high:g}]")
        try:
            update = E.parse(entry["update"])
        except E.ExprError as exc:
            problems.add(path + ("update",), f"cannot parse {entry['update']!r}: {exc}")
            continue
        out[name] = State(name, init, update, float(low), float(high))
    return out


def _check_training_extras(raw: dict, train: dict, evaluate: dict, latents: dict, states: dict, problems: Collector) -> None:
    """Names that train.trace, train.balance and evaluate.collapse point at must exist."""
    losses = raw.get("losses", {})
    for i, name in enumerate(train.get("trace", [])):
        if name not in losses and name not in states:
            problems.add(("train", "trace", i), f"no loss or state named {name!r}" + suggest(name, list(losses) + list(states)))
    balance = train.get("balance")
    if balance:
        latent = latents.get(balance["latent"])
        if latent is None or latent.prior != "categorical":
            problems.add(("train", "balance", "latent"), f"{balance['latent']!r} is not a latent with a categorical prior")
        if balance["images"] not in raw.get("graph", {}):
            problems.add(("train", "balance", "images"), f"no graph tensor named {balance['images']!r}")
        if not raw["data"].get("labels"):
            problems.add(("train", "balance",), "balancing needs the real class labels (data.labels: true)")
    if train.get("compile") and train.get("cuda_graphs") is True:
        problems.add(("train", "cuda_graphs"), "true cannot combine with train.compile, which records CUDA graphs of its "
                                               "own; use cuda_graphs: auto (off when compiling) or false")
    if train.get("loader") == "stream" and raw["data"].get("dataset") not in FILE_DATASETS:
        problems.add(("train", "loader"), f"stream decodes image files ({' and '.join(FILE_DATASETS)}); "
                                          f"{raw['data'].get('dataset')} is held in memory: use auto or memory")
    collapse = evaluate.get("collapse")
    if collapse and collapse["state"] not in states:
        problems.add(("evaluate", "collapse", "state"), f"no state named {collapse['state']!r}")
    elif collapse and collapse["state"] not in train.get("trace", []):
        problems.add(("evaluate", "collapse", "state"), f"state {collapse['state']!r} must be traced: add it to train.trace")



def _data_shape(data: dict, problems: Collector) -> tuple:
    dataset = data["dataset"]
    if dataset in ("image_folder", "celeba"):
        if "image_size" not in data:
            problems.add(("data",), f"{dataset} needs image_size")
            return (data.get("channels", 3), 1, 1), None
        c, h, w = data.get("channels", 3), data["image_size"], data["image_size"]
    else:
        c, h, w = DATASET_SHAPES[dataset]
        if "channels" in data and data["channels"] != c:
            problems.add(("data", "channels"), f"{dataset} has {c} channel(s)")
        if "image_size" in data:
            h = w = data["image_size"]
    pad = data.get("pad", 0)
    _check_split_sizes(dataset, data.get("split") or {}, data.get("pool", "official"), problems)
    return (c, h + 2 * pad, w + 2 * pad), DATASET_CLASSES.get(dataset)


def _check_split_sizes(dataset: str, split: dict, pool: str, problems: Collector) -> None:
    """A split larger than a dataset of known size fails now, at its key, not when the data loads
    (data.py's _split, whose rules this follows). `pool` train or all draws every split from one
    pool (the training set, or both sets merged); the test split of an official train / test
    pair is capped at the test set's size, with a note, and is not checked here."""
    sizes = DATASET_SIZES.get(dataset)
    if not sizes or not all(isinstance(split.get(k, 0), int) for k in ("train", "val", "test")):
        return
    if len(sizes) == 2 and pool in ("train", "all"):
        sizes = (sizes[0] if pool == "train" else sum(sizes),)
    val = split.get("val", 0)
    if len(sizes) == 2:
        train = split.get("train", 0)
        if train + val > sizes[0]:
            problems.add(("data", "split"), f"asks for {train + val} training and validation images but {dataset}'s "
                                            f"training set has {sizes[0]}")
        return
    n = sizes[0]
    test = split.get("test", max(1, n // 6))  # data.py's default test share
    asked = {"train": split.get("train"), "val": val, "test": test}
    total = sum(v for v in asked.values() if v is not None)  # without train given, train takes the rest
    if total > n:
        parts = ", ".join(f"{v} {k}" for k, v in asked.items() if v is not None)
        where = {"official": "", "train": "'s training set", "all": " (training and test sets together)"}[pool]
        problems.add(("data", "split"), f"asks for {total} images ({parts}) but {dataset}{where} has {n}")


def _latent(name: str, entry: dict, params: dict, problems: Collector) -> Latent:
    shape = entry["shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    path = ("latent", name, "prior")
    prior, args, kwargs = _call_of(path, entry.get("prior", "normal"), PRIORS, params, problems, PRIOR_KWARGS)
    if prior == "uniform" and len(args) == 2 and not args[0] < args[1]:
        problems.add(path, "uniform(low, high) needs low < high")
    if prior == "categorical" and (len(shape) != 1 or shape[0] < 2):
        problems.add(path, f"a categorical prior draws one-hot vectors: its shape is the number of classes, e.g. [10], not {list(shape)}")
    if prior == "codebook" and len(args) == 1 and (args[0] != int(args[0]) or args[0] < 2):
        problems.add(path, f"codebook: the number of codes must be a whole number >= 2, got {args[0]:g}")
    if prior == "codebook" and not shape:
        problems.add(path, "a codebook latent needs a shape: its first dimension is the code size, e.g. [16] or [16, 2, 2]")
    if prior == "realnvp":
        for key, value in kwargs.items():
            if value != int(value) or value < 1:
                problems.add(path, f"realnvp: {key} must be a whole number >= 1, got {value:g}")
        if len(shape) and _size(shape) < 2:
            problems.add(path, "a realnvp prior needs a latent of at least 2 dimensions")
        kwargs = {k: int(v) for k, v in kwargs.items()}
    if prior in plugins.PRIORS and plugins.PRIORS[prior].check is not None:
        refused = plugins.PRIORS[prior].check(tuple(args), dict(kwargs))
        if refused:
            problems.add(path, f"{prior}: {refused}")
    return Latent(name, shape, prior or "normal", tuple(args), dict(kwargs))


def _size(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _call_of(path: tuple, text: str, table: dict, params: dict, problems: Collector, keywords: dict | None = None):
    """Parse `name`, `name(a, b)` or `name(k=v)` whose args are constants; check them against `table`.

    Returns (name, positional args, keyword args with defaults filled in); name None on a problem.
    """
    keywords = keywords or {}
    try:
        node = E.parse(text)
        if isinstance(node, E.Name):
            name, args, kwargs = node.id, [], {}
        elif isinstance(node, E.Call):
            name = node.func
            args = [E.constant(a, params) for a in node.args]
            kwargs = {k: E.constant(v, params) for k, v in node.kwargs}
        else:
            raise E.ExprError("expected a name or a call like normal(0, 0.02)")
    except E.ExprError as exc:
        problems.add(path, str(exc))
        return None, [], {}
    if name not in table:
        problems.add(path, f"unknown {path[-1]} {name!r}; known: {', '.join(table)}")
        return None, [], {}
    if len(args) != len(table[name]):
        problems.add(path, f"{name} takes {len(table[name])} argument(s) ({', '.join(table[name]) or 'none'}), got {len(args)}")
        return None, [], {}
    allowed = keywords.get(name, {})
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        problems.add(path, f"{name} has no argument {unknown[0]!r}" + (f"; it takes {', '.join(allowed)}" if allowed else ""))
        return None, [], {}
    return name, args, {**allowed, **kwargs}


def _network(name, entry, data_shape, latents, params, problems, num_classes=None, blocks=None) -> Network | None:
    path = ("networks", name)
    input_shape = _input_shape(entry["input"], data_shape, latents, path, problems)
    conditions = _conditions(entry.get("condition", {}), latents, num_classes, path, problems)
    rows, ok = [], True
    for i, row in enumerate(entry["layers"]):
        try:
            parsed = parse_row(row)
            rows.append(expand(parsed, blocks or {}) if parsed["op"] == "block" else parsed)
        except UnsoundBlock:  # its definition's problems are reported where it is defined
            ok = False
        except RowError as exc:
            problems.add(path + ("layers", i), str(exc))
            ok = False
    init, init_args, _ = _call_of(path + ("init",), entry.get("init", "default"), INITS, params, problems)
    if init == "normal" and not (isinstance(init_args[1], (int, float)) and init_args[1] > 0):
        problems.add(path + ("init",), f"normal(mean, std): std must be positive, got {init_args[1]}")
        init = None
    if entry.get("spectral_norm"):  # the network's flag is the rows' flag, so `genspec show` lists it per row
        rows = [spectrally_normalised(r) for r in rows]
    if not ok or input_shape is None:
        return None
    if conditions is None:
        return None
    try:
        info = infer_network(input_shape, rows, entry.get("freeze", False), {k: shape for k, (shape, _) in conditions.items()})
    except ShapeError as exc:
        problems.add(path + ("layers", exc.index), str(exc))
        return None
    joined = {r["input"] for r in rows if r["op"] == "concat"}
    for unused in [c for c in conditions if c not in joined]:
        problems.add(path + ("condition", unused), f"condition {unused!r} is never joined: add a row 'concat {unused}'")
    source = entry["input"] if isinstance(entry["input"], str) else None
    return Network(name, input_shape, rows, info, init or "default", tuple(init_args), source, conditions)


def _conditions(entries: dict, latents: dict, num_classes, path: tuple, problems: Collector) -> dict | None:
    """Extra inputs of a network (a conditional GAN's labels): name -> (shape, source). A value is a
    shape, a latent's name (its draws), or y (the data's labels, one-hot)."""
    out, ok = {}, True
    for cname, value in entries.items():
        where = path + ("condition", cname)
        if isinstance(value, int):
            out[cname] = ((value,), None)
        elif isinstance(value, list):
            out[cname] = (tuple(value), None)
        elif value == "y":
            if num_classes is None:
                problems.add(where, "y (one-hot labels) needs a dataset with classes; give the shape instead")
                ok = False
            else:
                out[cname] = ((num_classes,), "y")
        elif value in latents:
            out[cname] = (tuple(latents[value].shape), value)
        else:
            problems.add(where, f"condition {value!r} is neither a shape, y (one-hot labels) nor a latent")
            ok = False
    return out if ok else None


def _input_shape(value, data_shape, latents, path, problems) -> tuple | None:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    if value == "x":
        return tuple(data_shape)
    if value in latents:
        return latents[value].shape
    problems.add(path + ("input",), f"input {value!r} is neither a shape, x (the data) nor a latent")
    return None


def _expressions(section: str, entries: dict, problems: Collector) -> dict:
    out = {}
    for name, text in entries.items():
        try:
            out[name] = E.parse(text)
        except E.ExprError as exc:
            problems.add((section, name), f"cannot parse {text!r}: {exc}")
    return out


def _objectives(entries: dict, networks: dict, declared: set, latents: dict, params: dict, problems: Collector) -> dict:
    """The objectives, each network (or trainable prior) it lists checked to exist and to have
    something to train. A network may be listed by several objectives (an adversarial
    autoencoder's encoder: reconstruction and regularisation, each with its own optimiser);
    that no phase updates two of them at once is `_check_phases_train_each_network_once`."""
    out = {}
    trained: set[str] = set()
    for name, entry in entries.items():
        path = ("objectives", name)
        nets = entry.get("networks", [name])
        for i, net in enumerate(nets):
            where = path + (("networks", i) if "networks" in entry else ())
            if net in latents:
                if not latents[net].trainable:
                    problems.add(where, f"latent {net!r} has a {latents[net].prior} prior, with nothing to train")
                trained.add(net)
                continue
            if net not in networks:
                if net not in declared:  # a declared network with a bad table has been reported already
                    problems.add(where, f"no network named {net!r} to train" + suggest(net, declared))
                continue
            trained.add(net)  # an entirely frozen network may be listed: it simply has nothing to train
        trainable = [n for n in nets if (n in networks and networks[n].info.trainable) or (n in latents and latents[n].trainable)]
        if not trainable and all(n in networks or n in latents for n in nets):
            problems.add(path + (("networks",) if "networks" in entry else ()),
                         f"nothing for this objective to train: {', '.join(repr(n) for n in nets)} "
                         f"{'is' if len(nets) == 1 else 'are'} entirely frozen")
        try:
            minimize = E.parse(entry["minimize"])
        except E.ExprError as exc:
            problems.add(path + ("minimize",), f"cannot parse {entry['minimize']!r}: {exc}")
            continue
        optimizer, args = _optimizer(path + ("optimizer",), entry["optimizer"], params, problems)
        out[name] = Objective(name, list(nets), minimize, optimizer or "adam", args, entry.get("clip"))
    for name, latent in latents.items():
        if latent.trainable and name not in trained:
            problems.add(("latent", name, "prior"), f"the {latent.prior} prior of {name!r} has parameters but no objective trains it "
                         f"(list {name!r} in the networks of the objective that should)")
    for net, info in networks.items():
        if net not in trained and info.info.trainable > 0:
            problems.add(("networks", net), f"network {net!r} has {info.info.trainable} trainable parameters but no objective trains it "
                         "(add an objective, or `freeze: true`)")
    return out


def _optimizer(path: tuple, text: str, params: dict, problems: Collector) -> tuple[str | None, dict]:
    try:
        node = E.parse(text)
        if not isinstance(node, E.Call) or node.func not in OPTIMIZERS:
            raise E.ExprError(f"expected one of {', '.join(f'{o}(lr, ...)' for o in OPTIMIZERS)}")
        allowed = OPTIMIZERS[node.func]
        if len(node.args) > 1:
            raise E.ExprError("only the learning rate is positional; name the others (betas=[0.5, 0.999])")
        args = {"lr": E.constant(node.args[0], params)} if node.args else {}
        for key, value in node.kwargs:
            if key not in allowed:
                raise E.ExprError(f"{node.func} has no argument {key!r}; it takes {', '.join(allowed)}")
            args[key] = E.constant(value, params)
        if "lr" not in args:
            raise E.ExprError("a learning rate is required, e.g. adam(2e-4)")
        if "betas" in args and (not isinstance(args["betas"], list) or len(args["betas"]) != 2):
            raise E.ExprError("betas is a pair, e.g. betas=[0.5, 0.999]")
        _check_optimizer_values(args)
    except E.ExprError as exc:
        problems.add(path, str(exc))
        return None, {}
    return node.func, args


def _check_optimizer_values(args: dict) -> None:
    """The ranges torch.optim checks only when the run builds its optimisers."""
    def number(key):
        value = args[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise E.ExprError(f"{key} must be a finite number, got {value!r}")
        return value

    if number("lr") <= 0:
        raise E.ExprError(f"the learning rate must be positive, got {args['lr']:g}")
    for key in ("eps", "weight_decay", "alpha"):
        if key in args and number(key) < 0:
            raise E.ExprError(f"{key} must not be negative, got {args[key]:g}")
    if "momentum" in args and not 0 <= number("momentum") < 1:
        raise E.ExprError(f"momentum must be in [0, 1), got {args['momentum']:g}")
    for beta in args.get("betas", []):
        if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise E.ExprError(f"betas must each be in [0, 1), got {args['betas']}")


def _phases(train: dict, objectives: dict, problems: Collector) -> list[Phase]:
    if "phases" not in train:
        return [Phase(update=list(objectives))]
    out, sound = [], True
    for i, entry in enumerate(train["phases"]):
        for j, name in enumerate(entry["update"]):
            if name not in objectives:
                sound = False
                problems.add(("train", "phases", i, "update", j), f"no objective named {name!r}" + suggest(name, objectives))
        epochs = tuple(entry["epochs"]) if "epochs" in entry else None
        if epochs and epochs[0] > epochs[1]:
            sound = False
            problems.add(("train", "phases", i, "epochs"), "first epoch after the last")
        if i == 0 and entry.get("batch") == "same":
            problems.add(("train", "phases", 0, "batch"), "the first phase has no phase before it whose batch it could share "
                                                         "(batch: same belongs on a later phase, e.g. the generator's)")
        out.append(Phase([n for n in entry["update"] if n in objectives], entry.get("repeat", 1), epochs,
                         entry.get("batch", "next")))
    if sound:  # a misspelt objective or a reversed window is the problem to report, not its consequence
        _check_every_objective_is_trained(train, objectives, out, problems)
    return out


def _check_every_objective_is_trained(train: dict, objectives: dict, phases: list[Phase], problems: Collector) -> None:
    """An objective that no phase updates within train.epochs would leave its networks as initialised."""
    for name in objectives:
        named = [p for p in phases if name in p.update]
        if not named:
            problems.add(("train", "phases"), f"no phase updates objective {name!r}: its networks would never train "
                                              "(add it to a phase's update list, or remove the objective)")
        elif not any(p.epochs is None or p.epochs[0] <= train["epochs"] for p in named):  # windows start by the last epoch
            problems.add(("train", "phases"), f"objective {name!r} is updated only in epochs "
                         + ", ".join(f"{p.epochs[0]}-{p.epochs[1]}" for p in named)
                         + f", after the last epoch (train.epochs is {train['epochs']}): it would never train")


def _check_phases_train_each_network_once(entries: dict, objectives: dict, latents: dict, train: dict,
                                          phases: list[Phase], problems: Collector) -> None:
    """Two objectives of one phase must not train the same network (or flow prior): the step
    would add both gradients into its parameters and step them with both optimisers. In
    different phases they may (an adversarial autoencoder's encoder), each phase stepping only
    its own objectives' optimisers. Without train.phases the one phase updates every objective."""
    for i, phase in enumerate(phases):
        first: dict[str, str] = {}  # network -> the first objective of this phase that trains it
        for name in phase.update:
            for k, net in enumerate(objectives[name].networks):
                if net not in first:
                    first[net] = name
                    continue
                what = f"the prior of {net!r}" if net in latents else f"network {net!r}"
                if "phases" in train:
                    where = ("train", "phases", i, "update", train["phases"][i]["update"].index(name))
                    problems.add(where, f"phase {i + 1} updates objectives {first[net]!r} and {name!r}, which both train "
                                        f"{what}: one step would add their gradients and step it with both optimisers; "
                                        f"give {name!r} a phase of its own (e.g. {{update: [{name}], batch: same}})")
                else:
                    where = ("objectives", name) + (("networks", k) if "networks" in entries.get(name, {}) else ())
                    problems.add(where, f"objectives {first[net]!r} and {name!r} both train {what}, and without "
                                        "train.phases one phase updates every objective: one step would add their "
                                        "gradients and step it with both optimisers; give each a phase of its own, e.g. "
                                        f"phases: [{{update: [{first[net]}]}}, {{update: [{name}], batch: same}}]")


def _check_names_do_not_clash(raw: dict, problems: Collector) -> None:
    """A name means one thing: an input, a network, a param, a tensor or a loss.

    A graph tensor may share its latent's name (`z: rsample(q)`): ops that take a latent
    (sample, kl) read the latent, everything else reads the tensor.
    """
    seen: dict[str, str] = {"x": "the input x", "y": "the labels y"}
    for section in ("networks", "params", "labels", "state", "graph", "losses"):
        for name in raw.get(section, {}):
            if name in seen:
                problems.add((section, name), f"name {name!r} is already used by {seen[name]}")
            else:
                seen[name] = f"{section}.{name}"
    for name in raw.get("latent", {}):
        if name in seen and not seen[name].startswith("graph."):
            problems.add(("latent", name), f"name {name!r} is already used by {seen[name]}")


__all__ = ["validate", "schema", "SpecError", "SCHEMA_PATH"]
