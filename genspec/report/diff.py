"""A semantic diff of two specs after resolution (extends and defaults applied).

Formatting, comments, key order and the way a row is written (compact or mapping) do not
count; params, data, latents, expressions (as canonical text), optimisers, schedule,
evaluation and every other section do. Layer tables are aligned row by row, the way a reader
compares two papers' architecture tables, with the changed cells named.
"""

from __future__ import annotations

import difflib
import json

from genspec.lang import expr as E
from genspec.lang.rows import canonical, format_row
from genspec.lang.shapes import fmt
from genspec.lang.spec import Spec, call_text

# Sections that describe the run rather than the model: shown in the header, never a difference.
METADATA = ("name", "source", "genspec")


def spec_view(spec: Spec) -> dict:
    """The parts of a spec that matter, as plain comparable data."""
    view = {
        "params": dict(spec.params),
        "data": dict(spec.data),
        "latent": {n: {"shape": list(l.shape), "prior": call_text(l.prior, l.prior_args)} for n, l in spec.latents.items()},
        "graph": {n: E.to_text(node) for n, node in spec.graph.items()},
        "losses": {n: E.to_text(node) for n, node in spec.losses.items()},
        "objectives": {n: {"networks": o.networks, "minimize": E.to_text(o.minimize),
                           "optimizer": o.optimizer + "(" + ", ".join(f"{k}={v}" for k, v in o.optimizer_args.items()) + ")"}
                       for n, o in spec.objectives.items()},
        "train": {k: v for k, v in spec.train.items() if k != "phases"},
        "phases": [{"update": p.update, "repeat": p.repeat, "epochs": list(p.epochs) if p.epochs else None,
                    "batch": p.batch} for p in spec.phases],
        "evaluate": dict(spec.evaluate),
    }
    known = set(view) | {"networks", "latent", "extends"} | set(METADATA)
    for section, value in spec.raw.items():
        if section not in known:
            view[section] = value  # sections added by later format versions (tune, sweep, ...)
    return view


def diff_specs(a: Spec, b: Spec) -> dict:
    """Structured differences: {"sections": [...], "networks": {...}}; empty lists when equivalent."""
    va, vb = spec_view(a), spec_view(b)
    changes = []
    for section in sorted(set(va) | set(vb)):
        changes += _changes(va.get(section), vb.get(section), (section,))
    networks = {}
    for name in list(a.networks) + [n for n in b.networks if n not in a.networks]:
        if name not in b.networks:
            networks[name] = {"status": "removed", "trainable": -a.networks[name].info.trainable}
        elif name not in a.networks:
            networks[name] = {"status": "added", "trainable": b.networks[name].info.trainable,
                              "rows": [{"op": "added", "b": format_row(r)} for r in b.networks[name].rows]}
        else:
            entry = _network_diff(a, b, name)
            if entry:
                networks[name] = entry
    return {"a": {"name": a.name, "file": a.file}, "b": {"name": b.name, "file": b.file},
            "changes": changes, "networks": networks}


def _changes(x, y, path: tuple) -> list[dict]:
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for key in list(x) + [k for k in y if k not in x]:
            if key not in y:
                out.append({"path": list(path + (key,)), "kind": "removed", "a": x[key]})
            elif key not in x:
                out.append({"path": list(path + (key,)), "kind": "added", "b": y[key]})
            else:
                out += _changes(x[key], y[key], path + (key,))
        return out
    if x == y:
        return []
    if x is None:
        return [{"path": list(path), "kind": "added", "b": y}]
    if y is None:
        return [{"path": list(path), "kind": "removed", "a": x}]
    return [{"path": list(path), "kind": "changed", "a": x, "b": y}]


def _network_diff(a: Spec, b: Spec, name: str) -> dict | None:
    na, nb = a.networks[name], b.networks[name]
    entry: dict = {}
    if na.input != nb.input:
        entry["input"] = [fmt(na.input), fmt(nb.input)]
    if (na.init, na.init_args) != (nb.init, nb.init_args):
        entry["init"] = [na.init_text, nb.init_text]
    frozen_a = [r.frozen for r in na.info.rows]
    frozen_b = [r.frozen for r in nb.info.rows]
    rows = _align_rows(na, nb)
    if any(r["op"] != "same" for r in rows) or (frozen_a != frozen_b and len(frozen_a) == len(frozen_b)):
        entry["rows"] = rows
    if not entry:
        return None
    entry["status"] = "changed"
    entry["trainable"] = nb.info.trainable - na.info.trainable
    entry["frozen"] = nb.info.frozen - na.info.frozen
    return entry


def _align_rows(na, nb) -> list[dict]:
    ka = [_row_key(r) for r in na.info.rows]
    kb = [_row_key(r) for r in nb.info.rows]
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ka, b=kb, autojunk=False).get_opcodes():
        if tag == "equal":
            out += [{"op": "same", "a": format_row(na.rows[i]), "index_a": i, "index_b": j}
                    for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        # Within a changed block, rows of the same op are the same layer with changed cells;
        # the rest were removed or added.
        ops_a = [na.info.rows[i].row["op"] for i in range(i1, i2)]
        ops_b = [nb.info.rows[j].row["op"] for j in range(j1, j2)]
        for tag2, p1, p2, q1, q2 in difflib.SequenceMatcher(a=ops_a, b=ops_b, autojunk=False).get_opcodes():
            if tag2 == "equal":
                for i, j in zip(range(i1 + p1, i1 + p2), range(j1 + q1, j1 + q2)):
                    out.append(_changed_row(na, nb, i, j))
                continue
            out += [{"op": "removed", "a": format_row(na.rows[i]), "index_a": i} for i in range(i1 + p1, i1 + p2)]
            out += [{"op": "added", "b": format_row(nb.rows[j]), "index_b": j} for j in range(j1 + q1, j1 + q2)]
    return out


def _changed_row(na, nb, i: int, j: int) -> dict:
    ra, rb = canonical(na.info.rows[i].row), canonical(nb.info.rows[j].row)
    cells = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k) and k != "frozen")
    if na.info.rows[i].frozen != nb.info.rows[j].frozen and "frozen" not in cells:
        cells.append("frozen")
    values = {c: [_cell(ra.get(c)), _cell(rb.get(c))] for c in cells}
    if "frozen" in values:  # a network-level freeze is not in the row: read the row's effective state
        values["frozen"] = [na.info.rows[i].frozen, nb.info.rows[j].frozen]
    return {"op": "changed", "a": format_row(ra), "b": format_row(rb), "index_a": i, "index_b": j, "cells": values}


def _cell(value):
    """A cell's value as the diff shows it: a block's rows (layers, shortcut) as compact rows."""
    if isinstance(value, list) and value and all(isinstance(r, dict) and "op" in r for r in value):
        return [format_row(r) for r in value]
    return value


def _row_key(info) -> str:
    return json.dumps({**canonical(info.row), "frozen": info.frozen}, sort_keys=True)


def is_equivalent(result: dict) -> bool:
    return not result["changes"] and not result["networks"]


# ---------------------------------------------------------------- renderings

def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def render_text(result: dict, markdown: bool = False) -> str:
    a, b = result["a"], result["b"]
    lines = [f"{'## ' if markdown else ''}{a['file']} ({a['name']})  ->  {b['file']} ({b['name']})", ""]
    if is_equivalent(result):
        return "\n".join(lines + ["equivalent: no differences after resolution", ""])
    if result["changes"]:
        if markdown:
            lines += ["| key | " + a["name"] + " | " + b["name"] + " |", "|---|---|---|"]
        for c in result["changes"]:
            key = ".".join(map(str, c["path"]))
            old = _value(c["a"]) if "a" in c else "(absent)"
            new = _value(c["b"]) if "b" in c else "(absent)"
            lines.append(f"| `{key}` | {old} | {new} |" if markdown else f"  {key}: {old} -> {new}")
        lines.append("")
    for name, net in result["networks"].items():
        counts = f"trainable {net['trainable']:+,}" + (f", frozen {net['frozen']:+,}" if net.get("frozen") else "")
        lines.append(f"{'### ' if markdown else ''}network {name}: {net['status']} ({counts})")
        for key in ("input", "init"):
            if key in net:
                lines.append(f"  {key}: {net[key][0]} -> {net[key][1]}")
        lines += _row_lines(net.get("rows", []), markdown)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _row_lines(rows: list[dict], markdown: bool) -> list[str]:
    if not rows:
        return []
    width = max(len(r.get("a", "")) for r in rows)
    marks = {"same": " ", "changed": "~", "removed": "-", "added": "+"}
    out = ["```"] if markdown else []
    for r in rows:
        left, right = r.get("a", ""), r.get("b", "") if r["op"] != "same" else r.get("a", "")
        cells = ""
        if r["op"] == "changed":
            cells = "   [" + "; ".join(f"{k}: {_value(v[0])} -> {_value(v[1])}" for k, v in r["cells"].items()) + "]"
        out.append(f"  {marks[r['op']]} {left.ljust(width)} | {right}{cells}")
    if markdown:
        out.append("```")
    return out
