"""The package shows the pipeline: stages import only from the stages before them, the import
graph has no cycle, and the training loop imports none of what attaches to it through hooks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import networkx as nx
import pytest
import torch

from spec_helpers import TINY_CONDITIONAL_GAN, cli_in_process

PACKAGE = Path(__file__).resolve().parent.parent / "genspec"
# the stages, in the order data flows through them; errors.py is shared by all, cli.py and the
# public APIs in __init__.py and plugins.py (what a plugin module imports) sit on top
STAGES = ["lang", "graph", "compiler", "data", "train", "measure", "report", "experiments"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The genspec modules a file imports, at its top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("genspec")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("genspec"):
                continue
            for alias in node.names:  # `from genspec.measure import fidelity` imports a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else base)
    return found - {name}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        graph.add_node(module_name(path))
        for target in imports_of(path):
            graph.add_edge(module_name(path), target)
    return graph


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_the_folders_are_the_stages():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(STAGES)
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "errors.py", "plugins.py"]


def test_each_stage_imports_only_from_the_stages_before_it():
    back_edges = [(a, b) for a, b in import_graph().edges
                  if stage(a) and stage(b) and STAGES.index(stage(b)) > STAGES.index(stage(a))]
    assert back_edges == []
    # the stages call neither the CLI nor the public API modules (which import from the stages)
    assert [(a, b) for a, b in import_graph().edges if stage(a) and b in ("genspec", "genspec.cli", "genspec.plugins")] == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    stages = nx.DiGraph((stage(a), stage(b)) for a, b in graph.edges if stage(a) and stage(b) and stage(a) != stage(b))
    assert list(nx.simple_cycles(stages)) == []
    assert sorted(map(sorted, nx.simple_cycles(graph))) == []


def test_errors_imports_nothing_of_genspec():
    assert imports_of(PACKAGE / "errors.py") == set()


def test_the_loop_knows_nothing_of_what_attaches_to_it():
    allowed = {"genspec.compiler.distributed", "genspec.compiler.model", "genspec.data.datasets", "genspec.errors",
               "genspec.lang.spec", "genspec.train.folder", "genspec.train.hooks"}
    assert imports_of(PACKAGE / "train" / "loop.py") <= allowed


# ---------------------------------------------------------------- hooks, as a plugin would use them



def test_a_registered_hook_hears_every_event_and_a_weight_constraint_is_one(tmp_path):
    """A hook registered from outside genspec (as a plugin registers one) attaches to a run and
    hears each event as often as the run says it happened; an `after_update` hook that clips the
    discriminator's weights (WGAN's constraint) leaves every weight of the trained run within
    the bound."""
    from genspec.train.hooks import AFTER_STEP, HOOKS, Hook, register_hook

    calls: dict[str, int] = {}
    clip = 0.01

    @register_hook("test_clip_and_count", order=AFTER_STEP)
    class ClipAndCount(Hook):
        def _count(self, event):
            calls[event] = calls.get(event, 0) + 1

        def run_start(self, run):
            self._count("run_start")

        def after_update(self, run, phase, losses):
            self._count("after_update")
            if "dis" in run.spec.phases[phase].update:
                with torch.no_grad():
                    for p in run.model.networks["dis"].parameters():
                        p.clamp_(-clip, clip)

        def step_end(self, run, step, losses):
            self._count("step_end")

        def epoch_end(self, run, record):
            self._count("epoch_end")
            record["clipped"] = clip

        def checkpoint(self, run, epoch, rank_streams):
            self._count("checkpoint")

        def run_end(self, run):
            self._count("run_end")

    try:
        text = TINY_CONDITIONAL_GAN.replace("train: {epochs: 1,", "train: {epochs: 2,")
        (tmp_path / "gan.yaml").write_text(text.replace("{update: [gen]}", "{update: [gen], batch: same}"))
        rc, _, err = cli_in_process("run", tmp_path / "gan.yaml", "--out", tmp_path / "run", "--no-progress")
        assert rc == 0, err
    finally:
        HOOKS.pop("test_clip_and_count")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = 2 * 2  # 64 examples in batches of 32, two epochs; each step updates dis then gen
    assert calls == {"run_start": 1, "after_update": 2 * steps, "step_end": steps, "epoch_end": 2,
                     "checkpoint": 2, "run_end": 1}
    assert [h["clipped"] for h in history] == [clip, clip]
    assert sum(h["updates"]["dis"] for h in history) == steps
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]["networks"]
    dis = [v for k, v in state.items() if k.startswith("dis.") and v.is_floating_point()]
    assert dis and all(v.abs().max() <= clip for v in dis)
    assert any(v.abs().max() > clip for k, v in state.items() if k.startswith("gen."))  # only the critic


def test_a_hook_name_is_registered_once():
    from genspec.train.hooks import Hook, register_hook

    with pytest.raises(ValueError, match="already registered"):
        @register_hook("evaluation")
        class Another(Hook):
            pass


def test_a_hook_that_is_not_a_hook_is_refused():
    from genspec.train.hooks import register_hook

    with pytest.raises(TypeError, match="not a genspec.train.hooks.Hook"):
        register_hook("not_a_hook")(object)
