"""genspec: compile declarative generative-model specs into PyTorch training runs.

    spec = genspec.load("specs/quickstart.yaml")   # resolved, validated, graph-linted
    nets = genspec.build(spec)                      # {"enc": nn.Module, "dec": nn.Module}
    run = genspec.load_run("reports/quickstart")    # trained networks of a finished run

Importing genspec does not import torch; `build` and `load_run` do.
"""

from __future__ import annotations


from genspec.errors import RunError, SpecError

__version__ = "0.1.0"


def load(path, overrides: list[str] | None = None):
    """The resolved, validated spec at `path` (with `--set`-style overrides). Raises SpecError."""
    from genspec.graph.pipeline import load_spec

    return load_spec(path, overrides)


def build(spec, device="cpu") -> dict:
    """The spec's networks as nn.Modules by name, initialised as the spec says."""
    from genspec.compiler.model import build as _build

    return _build(spec, device)


def load_run(folder, device="cpu"):
    """Load the trained networks of a run folder from its checkpoint (weights_only): a FinishedRun."""
    from genspec.train.finished import load_run as _load_run

    return _load_run(folder, device)


def __getattr__(name):
    if name == "FinishedRun":  # without importing torch for `import genspec`
        from genspec.train.finished import FinishedRun

        return FinishedRun
    raise AttributeError(f"module 'genspec' has no attribute {name!r}")


__all__ = ["load", "build", "load_run", "SpecError", "RunError", "FinishedRun"]
