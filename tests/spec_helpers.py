"""Shared helpers for the torch-free spec tests (loader, resolve, validate, graph, CLI).

Imported by the test modules as a plain module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from genspec.errors import Collector, SpecError
from genspec.graph import build_graph
from genspec.loader import load_text
from genspec.validate import validate

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "specs" / "quickstart.yaml"
QUICKSTART_TEXT = QUICKSTART.read_text()
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def quickstart_with(*replacements: tuple[str, str]) -> str:
    """The quick-start text with each (old, new) replaced; each `old` must occur exactly once."""
    text = QUICKSTART_TEXT
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the quick-start"
        text = text.replace(old, new)
    return text


def check(text: str, file: str = "spec.yaml"):
    """load -> validate -> graph lint, the torch-free front half, on YAML text. Returns the Spec."""
    spec = validate(load_text(text, file))
    problems = Collector(spec.doc.where)
    spec.graph_nx = build_graph(spec, problems)
    problems.raise_if_any()
    return spec


def problems_of(text: str, file: str = "spec.yaml") -> list[str]:
    """The located problem lines `check` reports for `text` (fails the test if there are none)."""
    try:
        check(text, file)
    except SpecError as exc:
        return [str(p) for p in exc.problems]
    raise AssertionError("expected a SpecError, but the spec is valid")


def run_cli(args: list[str], cwd: Path | str = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "genspec", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
