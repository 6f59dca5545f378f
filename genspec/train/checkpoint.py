"""Checkpoints: the model, optimiser moments and random streams after an epoch, written
atomically, and read back with `weights_only=True` so that `--resume` continues bit-for-bit on
CPU. The loop fires the `checkpoint` event when one is due; `CheckpointHook` writes it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from genspec.compiler import distributed as dist
from genspec.compiler.model import Model
from genspec.errors import RunError, plural
from genspec.train.folder import CHECKPOINT, FINAL_METRICS, atomic_write, atomic_write_text, read_history
from genspec.train.hooks import CHECKPOINTING, Hook, register_hook

def load_checkpoint(folder: Path, device) -> dict:
    """A run folder's checkpoint (weights only). A file cut short (a full disk, a copy that
    stopped) or not genspec's is a RunError that names it, not an unpickling traceback."""
    path = Path(folder) / CHECKPOINT
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{Path(folder)} has no {CHECKPOINT}: not a genspec run folder, or one stopped before its first checkpoint")
    except Exception as exc:  # torch raises RuntimeError, EOFError or pickle's errors for a damaged file
        raise RunError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}); "
                       "the checkpoint is damaged: start the run afresh with --overwrite") from None
    if not isinstance(state, dict) or not {"epoch", "model"} <= set(state):
        raise RunError(f"{path} is not a genspec checkpoint (it has no epoch and model)")
    return state


def restore(model: Model, out: Path, device, epochs: int, world: dist.World, seed: int) -> tuple[int, list]:
    state = load_checkpoint(out, device)
    done = int(state["epoch"])
    if done > epochs:  # equal: training is over, and the final evaluation runs again
        raise RunError(f"{out} already has {done} epoch{'s' if done != 1 else ''}, more than the {epochs} asked; "
                       f"to train on, ask for more, e.g. --resume --set train.epochs={done + 10}")
    try:
        model.load_state_dict(state["model"])
    except RunError as exc:
        raise RunError(f"{out / CHECKPOINT}: {exc}") from None
    epoch = int(state["epoch"])
    _restore_rng(state, world, seed, epoch)
    if not world.main:  # another rank of a distributed run: rank 0 keeps the folder
        return epoch + 1, []
    if epoch < epochs:  # training on: the old final metrics no longer describe the run (nor mark it finished)
        (out / FINAL_METRICS).unlink(missing_ok=True)
    history = [h for h in read_history(out) if h["epoch"] <= epoch]  # epochs after the checkpoint are redone
    # each epoch's record is appended before its checkpoint is written, so every epoch up to the
    # checkpoint's has one; a gap means metrics.jsonl was cut or removed since
    lost = sorted(set(range(1, epoch + 1)) - {h["epoch"] for h in history})
    if lost:
        raise RunError(f"{out / 'metrics.jsonl'} has no record of {plural(len(lost), 'epoch')} ({_ranges(lost)}) though the "
                       f"checkpoint holds {plural(epoch, 'epoch')}: the file was cut or removed, and a resumed run would "
                       "leave them out of its report. Put the file back, or start afresh with --overwrite")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return epoch + 1, history


def _ranges(numbers: list[int]) -> str:
    """Sorted [1, 2, 3, 7] -> '1-3, 7'."""
    runs = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _restore_rng(state: dict, world: dist.World, seed: int, epoch: int) -> None:
    """Continue the random streams the checkpoint saved: one process its own; under --nproc each
    rank its own, when the checkpoint holds as many ranks' streams. With another number of
    processes (or a checkpoint of one process) every rank starts a stream of its own instead
    (rank 0's on every rank would make the ranks draw the same noise): a fresh draw, not a replay,
    as each rank's share of a batch has changed too."""
    if world.distributed:
        streams = state.get("rank_rng", [])
        if len(streams) != world.size:
            if world.main:
                saved = f"{len(streams)} processes" if streams else "one process"
                print(f"genspec: the checkpoint holds the random streams of {saved}, not {world.size}: each process "
                      "draws a fresh stream of its own, so the resumed epochs are not a replay", file=sys.stderr)
            torch.manual_seed(dist.rank_seed(seed, world, epoch))
            return
        own = streams[world.rank]
        torch.set_rng_state(own["cpu"].cpu())
        if "cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["cuda"].cpu(), torch.cuda.current_device())  # setup chose this rank's GPU
        return
    torch.set_rng_state(state["rng"].cpu())
    if torch.cuda.is_available():  # the GPUs this machine has (it may have fewer than the saving one)
        for index, cuda_state in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def save_checkpoint(model: Model, out: Path, epoch: int, rank_streams: list[dict] | None = None) -> None:
    """The model, optimiser moments and random streams after `epoch`, written atomically.
    `rank_streams`: under --nproc every rank's streams (`distributed.gather_rng_states`)."""
    state = {"format": 1, "epoch": epoch, "model": model.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if rank_streams is not None:
        state["rank_rng"] = rank_streams
    def write(f):
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())

    atomic_write(out / CHECKPOINT, write, "wb")


@register_hook("checkpoint", order=CHECKPOINTING)
class CheckpointHook(Hook):
    """Writes the checkpoint whenever the loop says one is due (every `train.checkpoint_every`
    epochs and after the last), on the main process of a distributed run."""

    @classmethod
    def attach(cls, run):
        return cls() if run.world.main else None

    def checkpoint(self, run, epoch: int, rank_streams: list[dict] | None) -> None:
        save_checkpoint(run.model, run.out, epoch, rank_streams)
