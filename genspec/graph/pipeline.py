"""The torch-free front half of the pipeline: load -> resolve -> (expand sweep) -> validate -> graph."""

from __future__ import annotations

import copy
from pathlib import Path

from genspec.errors import Collector, Problem, SpecError
from genspec.graph.dependencies import build_graph
from genspec.lang.loader import Document
from genspec.lang.resolve import apply_overrides, resolve
from genspec.lang.spec import Spec
from genspec.lang.sweep import STUDY_KEYS, Run, expand, is_sweep
from genspec.lang.validate import study_problems, table_metric_problems, validate


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Resolve and validate a (single-run) spec and lint its graph. Raises SpecError with every problem."""
    doc = resolve(path, overrides)
    if is_sweep(doc):
        raise SpecError([Problem(doc.where(("sweep",)), ("sweep",),
                                 "this spec is a sweep of several runs; use load_runs (or genspec run / validate on it)")])
    return check(doc)


def check(doc: Document) -> Spec:
    spec = validate(doc)
    problems = Collector(spec.doc.where)
    spec.graph_nx = build_graph(spec, problems)
    problems.raise_if_any()
    return spec


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--set repeats=2` or `--set sweep...` change the study; every other override changes each run."""
    study = [o for o in overrides if o.split("=", 1)[0].split(".")[0].split("[")[0] in STUDY_KEYS]
    return study, [o for o in overrides if o not in study]


def load_runs(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None) -> list[tuple[Run, Spec]]:
    """Every run of a spec: one for a plain spec, the factorial for a sweep. Command-line
    overrides apply to each run after its levels. Problems of all runs are reported together."""
    study_level, per_run = split_overrides(overrides or [])
    doc = resolve(path, study_level)
    if isinstance(doc.data, dict) and any(key in doc.data for key in STUDY_KEYS):
        study_problems(doc)
    runs = expand(doc, only) if is_sweep(doc) else [Run("", {}, doc)]
    out, problems, seen = [], [], set()
    for run in runs:
        try:
            run.doc = apply_overrides(Document(copy.deepcopy(run.doc.data), dict(run.doc.locations), run.doc.file),
                                      per_run)
            out.append((run, check(run.doc)))
        except SpecError as exc:
            for p in exc.problems:
                key = (p.location, p.path, p.message)
                if key not in seen:  # the same mistake in a shared part is reported once
                    seen.add(key)
                    problems.append(Problem(p.location, p.path, p.message + (f" [in run {run.id}]" if run.id else ""), p.excerpt))
    if problems:
        raise SpecError(problems)
    table_metric_problems(doc, [spec for _, spec in out])
    return out


def is_study(runs: list[tuple[Run, Spec]]) -> bool:
    """Whether `load_runs` gave a study: a sweep's configurations, or one spec with `repeats` > 1
    (its seeds are a study of one configuration, genspec/experiments/study.py)."""
    first = runs[0][0]
    return len(runs) > 1 or bool(first.id) or (first.doc.data.get("repeats") or 1) > 1
