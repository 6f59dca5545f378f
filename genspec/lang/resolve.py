"""Stage 2: resolve `extends` chains and `--set KEY=VALUE` overrides into one document.

Mappings merge deeply (the child's keys win; `key: null` removes an inherited key); lists
and scalars are replaced whole, so a variant that changes one layer table restates that table
(or patches single rows with `{N: row}`). `extends` may list several bases: they merge in
order, each over the ones before it, and the spec over them all, so a row spec can mix a shared
reading (a fragment under a folder whose name starts with `_`) into its paper spec. Locations
follow the data: a key that came from the base file still points into the base file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from genspec.errors import Location, Problem, SpecError
from genspec.lang.loader import Document, load_file, load_text, regular_file_problem

_INDEX = re.compile(r"^(.*?)\[(-?\d+)\]$")


def resolve(path: str | Path, overrides: list[str] | None = None) -> Document:
    """Load `path`, follow its `extends` chain and apply `--set` overrides."""
    doc = _load_with_bases(Path(path), seen=())
    apply_overrides(doc, overrides or [])
    return doc


def is_fragment(file: Path, below: Path | None = None) -> bool:
    """A fragment (a reading that specs mix in through a list `extends`), not a spec: a file whose
    name, or a folder's name on its way down from `below` (default: just its own folder), starts
    with `_`."""
    parts = Path(file).relative_to(below).parts if below is not None else (Path(file).parent.name, Path(file).name)
    return any(part.startswith("_") for part in parts)


def apply_overrides(doc: Document, overrides: list[str]) -> Document:
    for text in overrides:
        _apply_override(doc, text)
    return doc


def _load_with_bases(path: Path, seen: tuple) -> Document:
    doc = load_file(path)
    if not isinstance(doc.data, dict) or "extends" not in doc.data:
        return doc
    names = doc.data["extends"]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError([Problem(doc.where(("extends",)), ("extends",),
                                 "must be a path to a base spec, or a list of them (merged in order, later wins)")])
    # A list composes: the first base is the spec the row comes from, later ones mix in a reading
    # (a fragment such as specs/_readings/*.yaml), each merged over the ones before it.
    base = None
    for index, name in enumerate(names):
        at = ("extends",) if isinstance(doc.data["extends"], str) else ("extends", index)
        layer = _load_base(doc, path, name, at, seen)
        base = layer if base is None else merge(base, layer)
    child = dict(doc.data)
    del child["extends"]
    return merge(base, Document(child, doc.locations, doc.file))


def _load_base(doc: Document, path: Path, base_name: str, at: tuple, seen: tuple) -> Document:
    """One base of `doc` (found relative to its file), its own bases resolved."""
    where = doc.where(at)
    base_path = (path.parent / base_name).resolve()
    if base_path in seen or base_path == path.resolve():
        raise SpecError([Problem(where, at, f"extends itself through {base_name}")])
    if not base_path.exists():
        raise SpecError([Problem(where, at, f"base spec {base_name} not found")])
    problem = regular_file_problem(base_path)
    if problem:
        raise SpecError([Problem(where, at, f"base spec {base_name}: {problem}")])
    try:
        base = _load_with_bases(base_path, seen + (path.resolve(),))
    except SpecError as exc:
        if any(p.message.startswith("YAML") for p in exc.problems):  # not YAML at all, or broken YAML
            first = exc.problems[0]
            raise SpecError([Problem(where, at, f"base spec {base_name} is not a readable spec: {first}")]) from None
        raise
    if not isinstance(base.data, dict):
        kind = {list: "a list", str: "text", type(None): "nothing"}.get(type(base.data), type(base.data).__name__)
        raise SpecError([Problem(where, at, f"base spec {base_name} holds {kind}, not a mapping of spec keys")])
    return base


def merge(base: Document, child: Document) -> Document:
    """Deep-merge `child` over `base` (both documents), keeping locations."""
    if not isinstance(base.data, dict):
        return child
    locations = dict(base.locations)
    # a patch {-1: row} is located under the index it lands on, where later stages look it up
    locations.update({_normalised(base.data, path): loc for path, loc in child.locations.items()})
    data = _merge_data(copy.deepcopy(base.data), child.data, (), child.where)
    return Document(data, locations, child.file)


def _normalised(data, path: tuple) -> tuple:
    out = []
    for part in path:
        if isinstance(data, list) and _is_index(part) and -len(data) <= part < 0:
            part += len(data)
        out.append(part)
        data = data[part] if isinstance(data, (dict, list)) and _has(data, part) else None
    return tuple(out)


def _has(container, key) -> bool:
    if isinstance(container, dict):
        return key in container
    return _is_index(key) and -len(container) <= key < len(container)


def _merge_data(base, child, path: tuple, where):
    if isinstance(base, dict) and isinstance(child, dict):
        for key, value in child.items():
            if value is None and key in base:
                del base[key]  # `key: null` removes what the base spec has (a baseline without its discriminator)
            else:
                base[key] = _merge_data(base[key], value, path + (key,), where) if key in base else copy.deepcopy(value)
        return base
    if isinstance(base, list) and isinstance(child, dict) and child and all(_is_index(k) for k in child):
        # {3: ..., -1: ...} patches items of a list: a variant changes one row, not the whole table
        out = list(base)
        for index, value in child.items():
            if not -len(out) <= index < len(out):
                raise SpecError([Problem(where(path + (index,)), path + (index,), f"no item {index} to patch: the list has {len(out)}")])
            out[index] = _merge_data(out[index], value, path + (index,), where)
        return out
    return copy.deepcopy(child)


def _is_index(key) -> bool:
    return isinstance(key, int) and not isinstance(key, bool)


def split_key(text: str) -> tuple:
    """`networks.enc.layers[2]` or `networks.enc.layers.2` -> ("networks", "enc", "layers", 2)."""
    parts: list = []
    for piece in text.split("."):
        indices = []
        while (m := _INDEX.match(piece)):
            piece, index = m.group(1), int(m.group(2))
            indices.insert(0, index)
        if piece:
            parts.append(int(piece) if piece.lstrip("-").isdigit() else piece)
        parts.extend(indices)
    return tuple(parts)


def _apply_override(doc: Document, text: str) -> None:
    where = Location(f"--set {text}")
    if "=" not in text:
        raise SpecError([Problem(where, (), "an override is KEY=VALUE, for example train.epochs=2")])
    key, raw = text.split("=", 1)
    path = split_key(key.strip())
    if not path:
        raise SpecError([Problem(where, (), "empty key")])
    if "" in key.strip().split("."):
        raise SpecError([Problem(where, (), f"{key.strip()!r} has an empty part between dots")])
    if path[0] == "extends":
        raise SpecError([Problem(where, path, "extends is followed when the spec is read, before any --set: "
                                              "write a variant that extends the spec instead")])
    try:
        value = load_text(raw, where.file).data if raw.strip() else ""
    except SpecError as exc:
        message = exc.problems[0].message
        raise SpecError([Problem(where, path, f"bad value {raw!r}: {message}")]) from None
    target = doc.data
    normal: list = []
    for i, part in enumerate(path):
        if isinstance(target, list) and isinstance(part, int) and -len(target) <= part < 0:
            part += len(target)  # layers[-1] is the last row: locate it as layers[N-1]
        normal.append(part)
        if i < len(path) - 1:
            target = _step_into(target, part, tuple(normal), where)
    path = tuple(normal)
    last = path[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or not -len(target) <= last < len(target):
            raise SpecError([Problem(where, path, f"no item {last} here (the list has {len(target)})")])
    elif not isinstance(target, dict):
        raise SpecError([Problem(where, path, "cannot set a key inside a plain value")])
    if value is None and isinstance(target, dict):
        target.pop(last, None)  # `--set evaluate.fid=null` removes the key, as `null` does in a variant
    else:
        target[last] = value
    # everything at and below the override now comes from the command line, and so does
    # every key on the way to it that the spec did not have (a misspelt section, say)
    for known in [p for p in doc.locations if p[: len(path)] == path]:
        del doc.locations[known]
    for i in range(1, len(path) + 1):
        doc.locations.setdefault(path[:i], where)
    doc.locations[path] = where


def _step_into(target, part, path: tuple, where: Location):
    if isinstance(target, dict):
        if part not in target or not isinstance(target[part], (dict, list)):
            target[part] = {}
        return target[part]
    if isinstance(target, list) and isinstance(part, int) and -len(target) <= part < len(target):
        if not isinstance(target[part], (dict, list)):
            target[part] = {}
        return target[part]
    raise SpecError([Problem(where, path, "no such list item or mapping here")])
