"""A finished run read back: its spec (from spec.resolved.yaml), trained networks and priors
(from checkpoint.pt, weights only) and final metrics. `genspec.load_run` is this."""

from __future__ import annotations

from pathlib import Path

from genspec.errors import RunError


class FinishedRun:
    """A finished run: its spec, trained networks (eval mode), and final metrics."""

    def __init__(self, folder: Path, spec, networks: dict, priors: dict, metrics: dict, epoch: int):
        self.folder, self.spec, self.networks, self.priors = folder, spec, networks, priors
        self.metrics, self.epoch = metrics, epoch

    def __repr__(self) -> str:
        return f"FinishedRun({str(self.folder)!r}, networks={list(self.networks)}, epoch={self.epoch})"


def load_run(folder, device="cpu") -> FinishedRun:
    """Load the trained networks of a run folder from its checkpoint (weights_only)."""
    import torch

    from genspec.compiler.model import build
    from genspec.graph.dependencies import build_graph
    from genspec.lang.loader import load_file
    from genspec.train.folder import CHECKPOINT, RESOLVED, finished_metrics
    from genspec.train.checkpoint import load_checkpoint
    from genspec.lang.validate import validate

    folder = Path(folder)
    if not (folder / CHECKPOINT).exists():
        raise RunError(f"{folder} has no {CHECKPOINT}: not a finished genspec run")
    spec = validate(load_file(folder / RESOLVED))
    spec.graph_nx = build_graph(spec)
    networks = build(spec, device)
    state = load_checkpoint(folder, device)
    from genspec.compiler.model import state_mismatch

    mismatch = state_mismatch(torch.nn.ModuleDict(networks), state["model"].get("networks", {}))
    if mismatch:
        raise RunError(f"{folder / CHECKPOINT} does not fit the run's spec.resolved.yaml: {mismatch}")
    torch.nn.ModuleDict(networks).load_state_dict(state["model"]["networks"])
    from genspec.compiler.priors import build_prior

    priors = {name: build_prior(latent).to(device) for name, latent in spec.latents.items()}
    torch.nn.ModuleDict(priors).load_state_dict(state["model"].get("priors", {}))
    for module in [*networks.values(), *priors.values()]:
        module.eval()
    metrics = finished_metrics(folder) or {}
    return FinishedRun(folder, spec, networks, priors, metrics, int(state["epoch"]))
