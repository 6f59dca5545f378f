"""Named blocks of rows: the top-level `blocks:` section, and `block NAME k=v` rows expanded.

    blocks:
      res:
        params: {ch: null, stride: 1}          # null: every row that uses the block gives a value
        layers: [bn, relu, "conv {ch} 3x3 /{stride}", bn, relu, "conv {ch} 3x3"]
        skip: add                              # output = shortcut(input) + rows(input)
        shortcut: ["conv {ch} 1x1 /{stride}"]  # only where the input's shape differs from the rows' output

A table row `block res ch=64` is one row. Expanded, its canonical mapping carries everything the
later stages need: {op: block, block: res, args: {ch: 64, stride: 1}, skip: add, layers: [...],
shortcut: [...]}, the rows parsed after each {param} in their text is replaced by its value.
Shape inference (shapes.py) and the compiled module (compiler/layers.Block) read that mapping.
Taps inside a block (`... as h`) are the block's own: its `add h` and `concat h` rows read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from genspec.errors import Collector, format_path, suggest
from genspec.lang.expr import number_text
from genspec.lang.registry import SPECTRAL_NORM_OPS
from genspec.lang.rows import RowError, parse_row

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
MAX_ROWS = 10_000  # rows one block row may expand to, nested blocks included


@dataclass
class Block:
    name: str
    params: dict  # param name -> default, None where a row must give it
    layers: list  # rows as written: strings with {param} in them, or mappings
    skip: str | None  # "add", "concat" or None (the rows in sequence)
    shortcut: list  # rows as written, applied to the input of an `add` block where shapes differ
    sound: bool = True  # False: its definition has a problem, reported at the definition


class UnsoundBlock(RowError):
    """A row uses a block whose definition has a problem, reported there already."""


def read_blocks(raw: dict, problems: Collector) -> dict[str, Block]:
    """The blocks section (already checked against the schema), each definition checked for
    placeholders that name no param and params that no row uses."""
    blocks = {}
    for name, entry in (raw or {}).items():
        params = dict(entry.get("params") or {})
        block = Block(name, params, list(entry["layers"]), entry.get("skip"), list(entry.get("shortcut") or []))
        used: set = set()
        for section in ("layers", "shortcut"):
            for j, row in enumerate(entry.get(section) or []):
                for message in _placeholder_problems(row, params, used):
                    problems.add(("blocks", name, section, j), f"block {name}: {message}")
                    block.sound = False
        for param in params:
            if param not in used:
                problems.add(("blocks", name, "params", param), f"block {name}: param {param!r} is used by none of its rows "
                             f"(write {{{param}}} where its value goes, or remove it)")
                block.sound = False
        if block.shortcut and block.skip != "add":
            problems.add(("blocks", name, "shortcut"), f"block {name}: a shortcut is what `skip: add` adds where the input's "
                         "shape differs from the rows' output; this block has " + (f"skip: {block.skip}" if block.skip else "no skip"))
            block.sound = False
        blocks[name] = block
    return blocks


def _placeholder_problems(row, params: dict, used: set) -> list[str]:
    if not isinstance(row, str):
        return []  # a mapping row is taken as written
    out = []
    for match in _PLACEHOLDER.finditer(row):
        key = match.group(1)
        used.add(key)
        if key not in params:
            known = f"its params: {', '.join(params)}" if params else "it has no params (add `params: {NAME: DEFAULT}`)"
            out.append(f"{{{key}}} is not a param of this block" + (suggest(key, params) or f"; {known}"))
    if "{" in _PLACEHOLDER.sub("", row) or "}" in _PLACEHOLDER.sub("", row):
        out.append(f"{row!r}: a brace that opens no {{param}}; a param's value is written {{NAME}}")
    return out


def expand(row: dict, blocks: dict[str, Block], stack: tuple = (), budget: list | None = None) -> dict:
    """A parsed `block` row -> its canonical mapping with the block's params bound and its rows
    parsed (nested blocks expanded too). Raises RowError saying what is wrong."""
    budget = [MAX_ROWS] if budget is None else budget
    name = row["block"]
    if name not in blocks:
        known = f"; blocks: {', '.join(blocks)}" if blocks else "; the spec has no blocks section"
        raise RowError(f"no block named {name!r}" + (suggest(name, blocks) or known))
    if name in stack:
        raise RowError(f"block {name} uses itself: {' -> '.join((*stack, name))}")
    block = blocks[name]
    if not block.sound:
        raise UnsoundBlock(f"block {name} has problems of its own")
    args = bind(block, row.get("args", {}))
    out = {**row, "args": args, "skip": block.skip,
           "layers": [_expand_row(block, "layers", j, r, args, blocks, (*stack, name), budget) for j, r in enumerate(block.layers)],
           "shortcut": [_expand_row(block, "shortcut", j, r, args, blocks, (*stack, name), budget)
                        for j, r in enumerate(block.shortcut)]}
    if row.get("sn"):
        out = spectrally_normalised(out)
        if not out.get("sn"):
            raise RowError(f"block {name}: 'sn' normalises the weights of its {', '.join(SPECTRAL_NORM_OPS)} rows, and it has none")
    return out


def bind(block: Block, given: dict) -> dict:
    """The values of a block's params: those the row gives, the defaults for the rest."""
    unknown = [k for k in given if k not in block.params]
    if unknown:
        known = f"; its params: {_signature(block)}" if block.params else "; it has no params"
        raise RowError(f"block {block.name} has no param {unknown[0]!r}" + (suggest(unknown[0], block.params) or known))
    missing = [k for k, default in block.params.items() if default is None and k not in given]
    if missing:
        raise RowError(f"block {block.name} needs {', '.join(missing)} (e.g. 'block {block.name} {missing[0]}=64'); "
                       f"its params: {_signature(block)}")
    return {k: given.get(k, default) for k, default in block.params.items()}


def _signature(block: Block) -> str:
    return ", ".join(k if v is None else f"{k}={_text(v)}" for k, v in block.params.items())


def _text(value) -> str:
    return value if isinstance(value, str) else number_text(value)


def substitute(text: str, args: dict) -> str:
    """A row's text with each {param} replaced by its value (the names were checked by read_blocks)."""
    return _PLACEHOLDER.sub(lambda m: _text(args[m.group(1)]), text)


def _expand_row(block: Block, section: str, j: int, written, args: dict, blocks: dict, stack: tuple, budget: list) -> dict:
    where = f"in block {block.name}, {format_path(('blocks', block.name, section, j))}"
    text = substitute(written, args) if isinstance(written, str) else written
    try:
        row = parse_row(text)
        budget[0] -= 1
        if budget[0] < 0:
            raise RowError(f"the block expands to more than {MAX_ROWS:,} rows")
        if row.get("frozen"):
            raise RowError("a block's own rows are never frozen one by one: freeze the row that uses the block ('block NAME ..., frozen')")
        if row["op"] == "gaussian":
            raise RowError("a gaussian head is a network's last row, not a row of a block")
        if row["op"] == "block":
            row = expand(row, blocks, stack, budget)
    except UnsoundBlock:
        raise
    except RowError as exc:
        shown = f" {text!r}" if isinstance(text, str) else ""
        raise RowError(f"{where}{shown}: {exc}") from None
    return row


def spectrally_normalised(row: dict) -> dict:
    """`sn` on the row (a conv, deconv or fc) or, for a block, on each such row inside it; other rows as they are."""
    if row["op"] in SPECTRAL_NORM_OPS:
        return {**row, "sn": True}
    if row["op"] != "block":
        return row
    layers = [spectrally_normalised(r) for r in row["layers"]]
    shortcut = [spectrally_normalised(r) for r in row["shortcut"]]
    if not any(r.get("sn") for r in layers + shortcut):
        return row  # nothing in it has a weight to normalise
    return {**row, "sn": True, "layers": layers, "shortcut": shortcut}
