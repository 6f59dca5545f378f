"""A finished run read back: its spec, trained networks and priors, and final metrics, from a run
folder (spec.resolved.yaml and checkpoint.pt, weights only) or from the one safetensors file
`genspec export` writes. `genspec.load_run` is this."""

from __future__ import annotations

import json
from pathlib import Path

from genspec.errors import RunError

# The metadata of a run exported as one safetensors file (`genspec export --format safetensors`):
# "format" is EXPORT_FORMAT, "spec" the resolved spec's YAML text, "epoch" and "metrics" (JSON)
# the run's; tensors are keyed `network.param` and `prior.<latent>.param`.
EXPORT_FORMAT = "genspec-run"
EXPORT_SUFFIX = ".safetensors"
PRIOR_PREFIX = "prior."


class FinishedRun:
    """A finished run: its spec, trained networks (eval mode), and final metrics. `folder` is
    where it was read from (a run folder or an exported file); `spec_text` the resolved spec's YAML."""

    def __init__(self, folder: Path, spec, networks: dict, priors: dict, metrics: dict, epoch: int,
                 spec_text: str = ""):
        self.folder, self.spec, self.networks, self.priors = folder, spec, networks, priors
        self.metrics, self.epoch, self.spec_text = metrics, epoch, spec_text

    def __repr__(self) -> str:
        return f"FinishedRun({str(self.folder)!r}, networks={list(self.networks)}, epoch={self.epoch})"


def is_exported(path) -> bool:
    """Whether `path` names an exported run (a .safetensors file) rather than a run folder."""
    path = Path(path)
    return path.suffix == EXPORT_SUFFIX and not path.is_dir()


def load_run(path, device="cpu") -> FinishedRun:
    """Load the trained networks of a run folder from its checkpoint (weights_only), or of a run
    exported as a safetensors file."""
    path = Path(path)
    if is_exported(path):
        return _load_exported(path, device)
    from genspec.lang.loader import load_file
    from genspec.train.checkpoint import load_checkpoint
    from genspec.train.folder import CHECKPOINT, RESOLVED, finished_metrics

    if not (path / CHECKPOINT).exists():
        raise RunError(f"{path} has no {CHECKPOINT}: not a finished genspec run")
    document = load_file(path / RESOLVED)
    state = load_checkpoint(path, device)
    model = state["model"]
    return _assemble(path, f"{path / CHECKPOINT} does not fit the run's {RESOLVED}", document,
                     (path / RESOLVED).read_text(), model.get("networks", {}), model.get("priors", {}),
                     finished_metrics(path) or {}, int(state["epoch"]), device)


def _load_exported(path: Path, device) -> FinishedRun:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from genspec.lang.loader import load_text

    if not path.exists():
        raise RunError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path} cannot be read as safetensors ({str(exc).splitlines()[0] if str(exc) else 'damaged'})") from None
    if metadata.get("format") != EXPORT_FORMAT or "spec" not in metadata:
        raise RunError(f"{path} is not a run exported by genspec (its metadata has no format {EXPORT_FORMAT!r} "
                       "and spec): write one with `genspec export RUN_DIR`")
    try:
        metrics = json.loads(metadata.get("metrics", "{}"))
        epoch = int(metadata.get("epoch", "0"))
    except ValueError:
        raise RunError(f"{path}: its metadata's epoch or metrics are damaged") from None
    networks = {k: v for k, v in tensors.items() if not k.startswith(PRIOR_PREFIX)}
    priors = {k[len(PRIOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PRIOR_PREFIX)}
    document = load_text(metadata["spec"], f"{path} (its metadata's spec)")
    return _assemble(path, f"{path} does not fit the spec in its metadata", document, metadata["spec"], networks,
                     priors, metrics if isinstance(metrics, dict) else {}, epoch, device)


def _assemble(where: Path, misfit: str, document, spec_text: str, network_state: dict, prior_state: dict,
              metrics: dict, epoch: int, device) -> FinishedRun:
    """The spec's networks and priors built afresh, then given the saved tensors (every one must fit)."""
    import torch

    from genspec.compiler.model import build, state_mismatch
    from genspec.compiler.priors import build_prior
    from genspec.graph.dependencies import build_graph
    from genspec.lang.validate import validate

    spec = validate(document)
    spec.graph_nx = build_graph(spec)
    networks = build(spec, device)
    priors = {name: build_prior(latent).to(device) for name, latent in spec.latents.items()}
    for modules, saved, what in ((networks, network_state, "network"), (priors, prior_state, "prior")):
        mismatch = state_mismatch(torch.nn.ModuleDict(modules), saved)
        if mismatch:
            if what == "prior":
                mismatch = mismatch.replace("network ", "latent ", 1)
            raise RunError(f"{misfit}: {mismatch}")
        torch.nn.ModuleDict(modules).load_state_dict(saved)
    for module in [*networks.values(), *priors.values()]:
        module.eval()
    return FinishedRun(where, spec, networks, priors, metrics, epoch, spec_text)
