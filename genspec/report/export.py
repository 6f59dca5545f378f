"""`genspec export RUN --format safetensors`: a finished run as one safetensors file.

Every network's state_dict (parameters and buffers: batch-norm statistics, a virtual batch norm's
reference batch) is stored under `network.param` (`dec.rows.0.linear.weight`), the priors' state
(a categorical latent's class weights, a flow's or codebook's parameters) under
`prior.<latent>.param`. A spectrally normalised weight is stored as its parametrization holds it
(`...parametrizations.weight.original` and the power iteration's `_u`, `_v`), so `load_run` of the
file rebuilds the very modules of the run folder. The metadata holds the resolved spec's YAML
text, the genspec version, the epoch and the final metrics (JSON): the file alone is the run for
`genspec.load_run` and `genspec sample`.
"""

from __future__ import annotations

from pathlib import Path

from genspec.errors import RunError
from genspec.train.finished import EXPORT_FORMAT, EXPORT_SUFFIX, PRIOR_PREFIX, FinishedRun
from genspec.train.folder import atomic_write, metrics_text


def run_tensors(run: FinishedRun) -> dict:
    """The run's tensors under their export keys: `network.param` and `prior.<latent>.param`."""
    if PRIOR_PREFIX.rstrip(".") in run.networks:
        raise RunError(f"cannot export: a network named {PRIOR_PREFIX.rstrip('.')!r} would share its keys with the "
                       "latent priors' state; rename the network")
    tensors = {}
    parts = [(f"{name}.", module) for name, module in run.networks.items()]
    parts += [(f"{PRIOR_PREFIX}{name}.", prior) for name, prior in run.priors.items()]
    for prefix, module in parts:
        for key, tensor in module.state_dict().items():
            # safetensors stores each tensor's own storage: copies, contiguous, on the CPU
            tensors[prefix + key] = tensor.detach().to("cpu").contiguous().clone()
    return tensors


def export_metadata(run: FinishedRun, version: str) -> dict:
    return {"format": EXPORT_FORMAT, "genspec_version": version, "epoch": str(run.epoch), "spec": run.spec_text,
            "metrics": metrics_text(run.metrics)}


def export_safetensors(run: FinishedRun, out: Path, version: str) -> Path:
    """Write the run as one safetensors file at `out` (atomically); returns the path."""
    from safetensors.torch import save

    out = Path(out)
    if out.suffix != EXPORT_SUFFIX:
        raise RunError(f"--out {out}: an exported run is a {EXPORT_SUFFIX} file (load_run and sample know it by that)")
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give the file to write")
    blob = save(run_tensors(run), metadata=export_metadata(run, version))
    atomic_write(out, lambda f: f.write(blob), "wb")
    return out


def default_export_path(run_path: Path, spec_name: str) -> Path:
    """RUN_DIR/<name>.safetensors (beside the file, for a run that is an export already)."""
    run_path = Path(run_path)
    folder = run_path if run_path.is_dir() else run_path.parent
    return folder / f"{spec_name}{EXPORT_SUFFIX}"
