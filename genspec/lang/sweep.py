"""Sweeps: a spec's `sweep:` factors expand into the full factorial of named runs.

    sweep:
      encoder:                       # a factor ...
        L: {}                        # ... and its levels, each an override of the base spec
        PNL: {networks: {enc: {freeze: all_but_last}}}
        RKS:
          networks: {enc: {freeze: true}}
          per:                       # parts of a level that depend on another factor's level
            layers:
              fc: {networks: {enc: {layers: [flatten, "gaussian 16 var=1e-6"]}}}
              conv: {...}
      layers: {fc: {...}, conv: {...}}
    repeats: 5                       # seeds per configuration

Overrides merge like `extends` (mappings deeply; `{-1: row}` patches one item of a list), in
factor order, `per` parts after the level's own. Every expanded run is a complete spec and is
validated as one, with locations pointing into the sweep file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from genspec.errors import Problem, SpecError
from genspec.lang.loader import Document
from genspec.lang.resolve import merge

STUDY_KEYS = ("sweep", "repeats", "study")


@dataclass
class Run:
    id: str  # "encoder=L,layers=fc"
    levels: dict  # factor -> level
    doc: Document


def is_sweep(doc: Document) -> bool:
    return isinstance(doc.data, dict) and "sweep" in doc.data


def factors(doc: Document) -> dict:
    return {f: list(levels) for f, levels in doc.data["sweep"].items()}


def expand(doc: Document, only: list[str] | None = None) -> list[Run]:
    """Every combination of levels (filtered by `only`, e.g. ["encoder=NL"]) as a resolved document."""
    sweep = doc.data.get("sweep")
    if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, dict) and v for v in sweep.values()):
        raise SpecError([Problem(doc.where(("sweep",)), ("sweep",), "a sweep maps each factor to its levels, "
                                 "e.g. {encoder: {L: {}, NL: {...}}}")])
    wanted = _parse_only(doc, only or [])
    base = Document({k: v for k, v in doc.data.items() if k not in STUDY_KEYS}, doc.locations, doc.file)
    runs = []
    names = list(sweep)
    for combo in itertools.product(*(list(sweep[f]) for f in names)):
        levels = dict(zip(names, combo))
        if any(levels[f] not in allowed for f, allowed in wanted.items()):
            continue
        merged = base
        for factor, level in levels.items():
            merged = _apply_level(merged, doc, factor, level, levels)
        runs.append(Run(",".join(f"{f}={l}" for f, l in levels.items()), levels, merged))
    return runs


def _apply_level(merged: Document, doc: Document, factor: str, level: str, levels: dict) -> Document:
    prefix = ("sweep", factor, level)
    override = doc.data["sweep"][factor][level]
    if override is None:
        return merged
    if not isinstance(override, dict):
        raise SpecError([Problem(doc.where(prefix), prefix, "a level is a mapping of overrides (or {})")])
    own = {k: v for k, v in override.items() if k != "per"}
    merged = merge(merged, _subdocument(doc, prefix, own))
    for other, cases in (override.get("per") or {}).items():
        path = prefix + ("per", other)
        if other not in levels or other == factor:
            raise SpecError([Problem(doc.where(path), path, f"per: {other!r} is not another factor of this sweep")])
        if not isinstance(cases, dict) or set(cases) - set(doc.data["sweep"][other]):
            unknown = sorted(set(cases) - set(doc.data["sweep"][other])) if isinstance(cases, dict) else []
            raise SpecError([Problem(doc.where(path), path, f"per {other}: levels are {', '.join(doc.data['sweep'][other])}"
                                     + (f"; unknown: {', '.join(unknown)}" if unknown else ""))])
        if levels[other] in cases and cases[levels[other]]:
            merged = merge(merged, _subdocument(doc, path + (levels[other],), cases[levels[other]]))
    return merged


def _subdocument(doc: Document, prefix: tuple, data) -> Document:
    """The part of `doc` under `prefix`, re-rooted, with its locations."""
    locations = {p[len(prefix):]: loc for p, loc in doc.locations.items() if p[: len(prefix)] == prefix and len(p) > len(prefix)}
    return Document(data, locations, doc.file)


def _parse_only(doc: Document, only: list[str]) -> dict:
    sweep = doc.data["sweep"]
    wanted: dict[str, set] = {}
    for item in only:
        factor, _, level = item.partition("=")
        if factor not in sweep or level not in sweep[factor]:
            known = "; ".join(f"{f}={'|'.join(sweep[f])}" for f in sweep)
            raise SpecError([Problem(doc.where(("sweep",)), ("sweep",), f"--only {item}: no such factor level ({known})")])
        wanted.setdefault(factor, set()).add(level)
    return wanted
