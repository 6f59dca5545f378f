"""The torch-free front half of the pipeline: load -> resolve -> validate -> graph."""

from __future__ import annotations

from pathlib import Path

from .errors import Collector
from .graph import build_graph
from .resolve import resolve
from .spec import Spec
from .validate import validate


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Resolve and validate a spec and lint its graph. Raises SpecError with every problem."""
    spec = validate(resolve(path, overrides))
    problems = Collector(spec.doc.where)
    spec.graph_nx = build_graph(spec, problems)
    problems.raise_if_any()
    return spec
