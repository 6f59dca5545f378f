"""The plugin registry: layer ops, expression ops and latent priors that Python modules add to the
language, and the loading of the modules a spec names (`plugins: [my_ops]`).

Plugins are the only place Python enters a spec. A plugin module calls the functions below (the
public face is genspec/plugins.py, which also offers the training loop's `register_hook`) when it
is imported; `load` imports the modules a spec names before its schema is checked, so that the
spec may then use their names exactly as built-ins. What validation needs is plain data read
here (a layer's options and shape function, an op's argument and result kinds, a prior's
parameters); the built-in tables that validation and the graph read (registry.EXPRESSION_OPS,
PRIORS, PRIOR_KWARGS) gain the plugin's entries, and rows.py, shapes.py and the compiler look
the plugin's layers up here. What runs (an nn.Module builder, a torch function) is kept as an
opaque callable that only the compiler calls: this module never imports torch, and neither
does a spec without plugins.

A module is found, in this order: as a `genspec.plugins` entry point of that name (an installed
package's plugin), beside the YAML file that names it, in the project's plugins/ folder (the
project: the nearest folder above that file with a specs/ folder or a pyproject.toml; a run
folder's spec.resolved.yaml finds it there too), or anywhere on the Python path.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from genspec.lang import registry as R
from genspec.lang.loader import project_root

ENTRY_POINT_GROUP = "genspec.plugins"
PROJECT_FOLDER = "plugins"  # a project's own plugins: <project>/plugins/<module>.py

# What a plugin op's arguments may be: a batch (tensor), a tensor or a scalar or a number (any), a
# constant (number), a Gaussian head's output (dist: a genspec.compiler.layers.Gaussian) or the
# labels y (a tensor of class indices). The built-ins' network, latent and target arguments need
# the compiler's own handling, so they stay the built-ins'.
PLUGIN_ARG_KINDS = ("tensor", "any", "number", "dist", "labels")
RESULT_KINDS = ("tensor", "scalar", "same")
OPTION_TYPES = (int, float, bool, str)

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LAYER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a row's first word
_OP_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_OPTION_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_ROW_WORDS = ("frozen", "sn", "as")  # words a row gives a meaning of its own


class PluginError(ValueError):
    """A plugin that cannot be loaded or registers what it may not; located at the spec's
    `plugins` item when it happens while loading one."""


@dataclass(frozen=True)
class PluginLayer:
    name: str
    shape: Callable  # (row, in_shape) -> out_shape; raises ValueError for an input it does not fit
    build: Callable  # (row, in_shape, out_shape) -> nn.Module
    options: dict  # option -> default value, or a type (int, float, bool, str) for an option without one
    params: Callable | None  # (row, in_shape, out_shape) -> how many parameters it has; None: none
    doc: str
    module: str

    def required(self) -> list[str]:
        return [k for k, v in self.options.items() if isinstance(v, type)]

    def defaults(self) -> dict:
        return {k: v for k, v in self.options.items() if not isinstance(v, type)}

    def option_type(self, option: str) -> type:
        value = self.options[option]
        return value if isinstance(value, type) else type(value)

    def count(self, row: dict, in_shape: tuple, out_shape: tuple) -> int:
        return int(self.params(row, in_shape, out_shape)) if self.params else 0


@dataclass(frozen=True)
class PluginOp:
    name: str
    fn: Callable  # the torch function: one value per argument -> the result
    args: tuple
    result: str
    doc: str
    module: str
    same_shape: bool = False  # its tensor arguments must have one shape (checked at validation)


@dataclass(frozen=True)
class PluginPrior:
    name: str
    build: Callable  # (latent: genspec.lang.spec.Latent) -> nn.Module with sample(n, device) and log_prob(z)
    params: tuple  # positional parameters: laplace(scale)
    kwargs: dict  # keyword parameters with their defaults
    trainable: bool  # whether the module has parameters an objective trains
    check: Callable | None  # (args, kwargs) -> a message for values it refuses, or None
    parameters: Callable | None  # (latent) -> number of trainable parameters (shown in reports)
    doc: str
    module: str


LAYERS: dict[str, PluginLayer] = {}
OPS: dict[str, PluginOp] = {}
PRIORS: dict[str, PluginPrior] = {}

_BUILTIN_OPS = frozenset(R.EXPRESSION_OPS)
_BUILTIN_PRIORS = frozenset(R.PRIORS)


@dataclass
class _State:
    version: int = 0  # bumped at every change, for the cached schema
    loading: list = field(default_factory=list)  # registrations of the module being imported, for rollback
    imported: list = field(default_factory=list)  # modules `load` imported, oldest first


_state = _State()


def _caller_module() -> str:
    return sys._getframe(2).f_globals.get("__name__", "?")


def _changed(kind: str, name: str) -> None:
    _state.version += 1
    if _state.loading:
        _state.loading[-1].append((kind, name))


def _refuse_clash(kind: str, name: str, table: dict, builtin, module: str) -> None:
    if name in builtin:
        raise PluginError(f"{kind} {name!r} is a built-in of genspec; a plugin names its own (e.g. a prefix)")
    if name in table and table[name].module != module:
        raise PluginError(f"{kind} {name!r} is already registered by plugin {table[name].module}")


def _callable(what: str, value) -> None:
    if not callable(value):
        raise PluginError(f"{what} must be callable, got {type(value).__name__}")


# ---------------------------------------------------------------- registration (the public API)

def register_layer(name: str, *, shape: Callable, build: Callable, options: dict | None = None,
                   params: Callable | None = None, doc: str = "") -> None:
    """A layer op, written in a table as `NAME`, `NAME VALUE...` (options in order) or `NAME KEY=VALUE`,
    optionally closed by a norm, an activation and dropout like any row.

    shape(row, in_shape) -> out_shape   row: the canonical mapping {op: NAME, option: value, ...};
                                        raise ValueError("...") for an input it does not fit
    build(row, in_shape, out_shape)     -> the nn.Module (shapes without the batch dimension)
    options                             {option: default}, or {option: int|float|bool|str} for one
                                        the row must give
    params(row, in_shape, out_shape)    -> how many parameters it has (torch-free: `genspec show`
                                        counts them); the compiler checks the built module agrees
    """
    module = _caller_module()
    options = dict(options or {})
    if not isinstance(name, str) or not _LAYER_NAME.match(name):
        raise PluginError(f"layer op {name!r}: a name of lowercase letters, digits and _ (a row's first word)")
    _refuse_clash("layer op", name, LAYERS, set(R.LAYER_OPS) | set(_ROW_WORDS), module)
    _callable(f"layer op {name!r}: shape", shape)
    _callable(f"layer op {name!r}: build", build)
    if params is not None:
        _callable(f"layer op {name!r}: params", params)
    for option, default in options.items():
        if not isinstance(option, str) or not _OPTION_NAME.match(option) or option in R.ROW_KEYS:
            raise PluginError(f"layer op {name!r}: option {option!r} must be a plain lowercase name and not one of "
                              f"the row keys every row has ({', '.join(R.ROW_KEYS)})")
        if not (default in OPTION_TYPES or type(default) in OPTION_TYPES):
            raise PluginError(f"layer op {name!r}: option {option!r} has a default of type {type(default).__name__}; "
                              "options are int, float, bool or str (or the type itself, for a required option)")
    LAYERS[name] = PluginLayer(name, shape, build, options, params, doc, module)
    _changed("layer", name)


def register_op(name: str, *, fn: Callable, args: tuple, result: str, same_shape: bool = False, doc: str = "") -> None:
    """An expression op, called in graph, losses and objectives as `NAME(a, b, ...)`.

    fn        the torch function, called with one value per argument at every step
    args      the argument kinds, one per argument: tensor, any, number, dist, labels
    result    scalar (a loss value), same (the kind and shape of the first argument), or tensor
              (a batch shaped as the first argument)
    same_shape  its tensor arguments must have the same shape (as sqerr's): a mismatch is reported
              at validation, at the network row that made the odd one out
    """
    module = _caller_module()
    if not isinstance(name, str) or not _OP_NAME.match(name):
        raise PluginError(f"op {name!r}: a name of lowercase letters, digits and _")
    _refuse_clash("op", name, OPS, _BUILTIN_OPS, module)
    _callable(f"op {name!r}: fn", fn)
    args = tuple(args)
    if not args or any(kind not in PLUGIN_ARG_KINDS for kind in args):
        raise PluginError(f"op {name!r}: args is a non-empty list of argument kinds, each one of "
                          f"{', '.join(PLUGIN_ARG_KINDS)}; got {list(args)}")
    if result not in RESULT_KINDS:
        raise PluginError(f"op {name!r}: result is one of {', '.join(RESULT_KINDS)}, got {result!r}")
    OPS[name] = PluginOp(name, fn, args, result, doc, module, bool(same_shape))
    R.EXPRESSION_OPS[name] = {"args": args, "result": result, "doc": doc, "plugin": module}
    _changed("op", name)


def register_prior(name: str, *, build: Callable, params: tuple = (), kwargs: dict | None = None,
                   trainable: bool = False, check: Callable | None = None, parameters: Callable | None = None,
                   doc: str = "") -> None:
    """A latent prior, written `prior: NAME`, `NAME(a, b)` or `NAME(key=v)` as the built-ins.

    build(latent)         -> an nn.Module with sample(n, device) (a batch of n draws of latent.shape)
                             and log_prob(z) (summed over the latent's dimensions; kl(q, z) uses it
                             in a one-draw Monte Carlo estimate); latent.prior_args and
                             latent.prior_kwargs hold the spec's values
    params / kwargs       the positional parameter names / the keyword parameters with defaults
    trainable             the module has parameters, trained by the objective that lists the latent
    check(args, kwargs)   -> a message for values it refuses (reported at the spec's prior), or None
    parameters(latent)    -> its trainable parameters, for reports
    """
    module = _caller_module()
    if not isinstance(name, str) or not _OP_NAME.match(name):
        raise PluginError(f"prior {name!r}: a name of lowercase letters, digits and _")
    _refuse_clash("prior", name, PRIORS, _BUILTIN_PRIORS, module)
    _callable(f"prior {name!r}: build", build)
    for what, fn in (("check", check), ("parameters", parameters)):
        if fn is not None:
            _callable(f"prior {name!r}: {what}", fn)
    params, kwargs = tuple(params), dict(kwargs or {})
    if not all(isinstance(p, str) for p in (*params, *kwargs)):
        raise PluginError(f"prior {name!r}: parameter names are strings")
    PRIORS[name] = PluginPrior(name, build, params, kwargs, bool(trainable), check, parameters, doc, module)
    R.PRIORS[name] = params
    if kwargs:
        R.PRIOR_KWARGS[name] = kwargs
    _changed("prior", name)


def unregister(name: str) -> None:
    """Remove a plugin's layer op, op or prior of this name (a test's clean-up)."""
    if name in LAYERS:
        del LAYERS[name]
    if name in OPS:
        del OPS[name]
        R.EXPRESSION_OPS.pop(name, None)
    if name in PRIORS:
        del PRIORS[name]
        R.PRIORS.pop(name, None)
        R.PRIOR_KWARGS.pop(name, None)
    _state.version += 1


def _put(kind: str, entry) -> None:
    if kind == "layer":
        LAYERS[entry.name] = entry
    elif kind == "op":
        OPS[entry.name] = entry
        R.EXPRESSION_OPS[entry.name] = {"args": entry.args, "result": entry.result, "doc": entry.doc, "plugin": entry.module}
    else:
        PRIORS[entry.name] = entry
        R.PRIORS[entry.name] = entry.params
        if entry.kwargs:
            R.PRIOR_KWARGS[entry.name] = entry.kwargs
    _state.version += 1


@contextlib.contextmanager
def isolated():
    """Every registration made inside the block is undone on leaving it, and the plugin modules
    `load` imported inside it are forgotten (so that loading them again registers them again).
    For tests; genspec.plugins.isolated also restores the training hooks."""
    saved = {"layer": dict(LAYERS), "op": dict(OPS), "prior": dict(PRIORS)}
    imported = len(_state.imported)
    try:
        yield
    finally:
        for name in {*LAYERS, *OPS, *PRIORS}:
            unregister(name)
        for kind, entries in saved.items():
            for entry in entries.values():
                _put(kind, entry)
        for module in _state.imported[imported:]:
            sys.modules.pop(module, None)
        del _state.imported[imported:]


def layer_ops() -> tuple:
    """Every layer op a row may open with: the built-ins, then the plugins'."""
    return R.LAYER_OPS + tuple(LAYERS)


# ---------------------------------------------------------------- loading the plugins a spec names

def load(doc, problems) -> tuple[str, ...]:
    """Import the plugin modules `doc` names; a module that is missing or fails is reported at its
    item. Returns the names of the modules loaded (a hook asks `__name__ in run.spec.plugins`)."""
    names = doc.data.get("plugins") if isinstance(doc.data, dict) else None
    if not isinstance(names, list):
        return ()  # absent, or not a list: the schema says what it should be
    loaded = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _MODULE.match(name):
            continue  # the schema reports it
        item = doc.where(("plugins", i)).file
        near = item if Path(item).is_file() else doc.file
        try:
            loaded.append(load_module(name, near))
        except PluginError as exc:
            problems.add(("plugins", i), str(exc))
    return tuple(loaded)


def search_folders(spec_file: str) -> list[Path]:
    """Where a spec's plugin modules are looked for before the Python path: the folder of the spec
    file, then its project's plugins/ folder."""
    path = Path(spec_file)
    if not path.is_file():
        return []
    folders = [path.resolve().parent]
    root = project_root(spec_file)
    if root is not None and (root / PROJECT_FOLDER).is_dir():
        folders.append(root / PROJECT_FOLDER)
    return folders


def load_module(name: str, spec_file: str = "<string>") -> str:
    """Import one plugin (an entry point of that name, else a module) and return its module's name.
    A failure raises PluginError with the reason in one line; what the module registered before it
    failed is undone."""
    entry = _entry_point(name)
    _state.loading.append([])
    try:
        if entry is not None:
            module = _load_entry_point(name, entry)
        else:
            module = _import(name, search_folders(spec_file))
    except PluginError:
        for kind, registered in _state.loading[-1]:
            unregister(registered)
        raise
    finally:
        _state.loading.pop()
    return module


def _entry_point(name: str):
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    return found[0] if found else None


def _load_entry_point(name: str, entry) -> str:
    module = entry.value.split(":")[0].strip()
    fresh = module not in sys.modules
    try:
        target = entry.load()
        if callable(target) and not isinstance(target, type(sys)):  # `pkg.mod:register`: a function to call
            target()
    except PluginError as exc:
        raise PluginError(f"plugin {name!r} ({ENTRY_POINT_GROUP} entry point {entry.value}): {exc}") from None
    except Exception as exc:
        raise PluginError(f"plugin {name!r} ({ENTRY_POINT_GROUP} entry point {entry.value}) failed: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    if fresh:
        _state.imported.append(module)
    return module


def _import(name: str, folders: list[Path]) -> str:
    fresh = name not in sys.modules
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added  # for this import only: a spec's folder does not stay on the path
    importlib.invalidate_caches()
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            where = ", ".join(str(f) for f in folders) if folders else "no folder (the spec is not a file)"
            raise PluginError(f"no plugin module {name!r}: looked beside the spec and in the project's "
                              f"{PROJECT_FOLDER}/ folder ({where}), on the Python path, and among the "
                              f"{ENTRY_POINT_GROUP!r} entry points") from None
        raise PluginError(f"plugin {name!r} failed to import: ModuleNotFoundError: {_one_line(exc)}") from None
    except PluginError as exc:
        raise PluginError(f"plugin {name!r}: {exc}") from None
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to import: {type(exc).__name__}: {_one_line(exc)}") from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    if fresh:
        _state.imported.append(name)
    return name


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"


# ---------------------------------------------------------------- the schema, widened by plugins

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_schema_cache: dict = {}


def extend_schema(schema: dict) -> dict:
    """The spec schema with the plugins' names in it: their layer ops and options in the canonical
    row, their priors in the prior pattern. The schema itself while no plugin is registered."""
    if not (LAYERS or PRIORS):
        return schema
    key = (id(schema), _state.version)
    if key not in _schema_cache:
        _schema_cache.clear()
        _schema_cache[key] = _widened(schema)
    return _schema_cache[key]


def _widened(schema: dict) -> dict:
    out = copy.deepcopy(schema)
    row = out["$defs"]["row"]["oneOf"][1]["properties"]
    row["op"]["enum"] = [*row["op"]["enum"], *LAYERS]
    for layer in LAYERS.values():
        for option in layer.options:  # two plugins may share an option name, with types of their own
            known = row.get(option, {}).get("type", [])
            types = sorted({*([known] if isinstance(known, str) else known), _JSON_TYPES[layer.option_type(option)]})
            row[option] = {"type": types[0] if len(types) == 1 else types}
    prior = out["properties"]["latent"]["additionalProperties"]["properties"]["prior"]
    prior["pattern"] = re.sub(r"\(([a-z_|]+)\)", lambda m: "(" + "|".join([*m.group(1).split("|"), *PRIORS]) + ")",
                              prior["pattern"], count=1)
    return out
