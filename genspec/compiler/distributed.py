"""Data-parallel training across processes: `genspec run SPEC --nproc N` (torchrun).

`launch` re-runs the same command under `torch.distributed.run`; each process then calls
`setup`, which joins the process group (NCCL on GPUs, gloo on CPU) and picks its device. A
command started by an outer torchrun (WORLD_SIZE set: several nodes, rendezvous flags) skips
`launch` and joins the same way. Every rank trains on its own slice of each global batch (the
DistributedSampler idea applied to genspec's tensor batches), and only rank 0 evaluates and
writes the run folder.

Gradients are averaged by one DistributedDataParallel wrapper per network (`wrap`), which
overlaps the all-reduce of each bucket with the rest of the backward pass. A genspec step runs
one forward pass and then one `backward(inputs=own params)` per objective; that suits per-network
wrappers because

- every trainable parameter belongs to exactly one objective of a phase (validate checks it; an
  adversarial autoencoder's encoder has objectives in two phases, and one wrapper serves both), so
  in a step a network's parameters get their gradients in exactly one backward pass, its objective's: the
  other passes are restricted by `inputs=` and never run its AccumulateGrad nodes, so its
  reducer's hooks fire once per parameter and step. Several forwards before that one backward
  (VAE-GAN's dis(x), dis(x_rec), dis(x_p)) are fine: DDP only asks for one backward per
  reduction, and the gradients of all the forwards (and of `gp`, which calls the raw critic)
  are summed in the AccumulateGrad node before its hook fires;
- in a phase, a network is called through its wrapper only if the phase updates it (`Env.callers`,
  set from the phase's objectives); elsewhere it is called raw, so a reducer is only prepared in a
  step that will reduce it (what `no_sync` relies on too): a GAN's generator phase reads
  dis(gen(z)) through the raw discriminator;
- a parameter its objective's loss does not reach would leave its bucket unreduced and the next
  forward failing ("Expected to have finished reduction"); `find_unused_parameters` cannot see
  it (a network's forward returns every tap, so every parameter looks used), so the step checks
  after each backward that a wrapped network got all its gradients or none (`check_reached`) and
  stops with the rows that got none. An objective whose loss does not require grad this step
  runs no backward: no hook fires and the reducer is not left waiting.

Not wrapped: networks with no trainable parameter (frozen feature extractors: DDP refuses them;
DDP also skips the frozen rows of `freeze: all_but_last`), and priors. A trainable prior (a
RealNVP flow) is not called as a network, so its gradients keep the flat all-reduce of
`average_gradients`; states (BEGAN's k) follow their mean (`average_tensors`). `model.networks`
stay the raw modules: evaluation, sampling, checkpoints (unprefixed keys), torch.compile and
channels-last work on them, and the wrappers share their parameters.
"""

from __future__ import annotations

import atexit
import inspect
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from genspec.errors import RunError
from genspec.lang.validate import batch_norm_network


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # the processes on this machine

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def from_environment() -> World:
    """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def rank_seed(seed: int, world: World, epoch: int = 0) -> int:
    """The seed of a rank's own noise: every rank starts from the same weights, then draws apart
    (`epoch`: a stream afresh on resuming after that epoch with another number of processes)."""
    return seed + 7919 * world.rank + 104_729 * epoch


def gather_rng_states(world: World, device: torch.device) -> list[dict]:
    """Every rank's random streams (its CPU generator, and its own GPU's where it trains on one),
    in rank order, on every rank: the checkpoint keeps them all, so that a resume with as many
    processes continues each rank's noise where it stopped. Sent as one byte tensor per rank
    (not pickled objects); every rank runs the same torch, so the CPU state has one length."""
    import torch.distributed as dist

    own = [torch.get_rng_state()]
    if device.type == "cuda":
        own.append(torch.cuda.get_rng_state(device))
    flat = torch.cat(own)
    wire = device if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL moves GPU tensors only
    gathered = [torch.empty_like(flat, device=wire) for _ in range(world.size)]
    dist.all_gather(gathered, flat.to(wire))
    cpu_length = len(own[0])
    streams = []
    for state in (g.cpu() for g in gathered):
        streams.append({"cpu": state[:cpu_length], **({"cuda": state[cpu_length:]} if device.type == "cuda" else {})})
    return streams


def launch(argv: list[str], nproc: int) -> int:
    """Run `genspec ARGV` in `nproc` processes on this machine through torchrun."""
    if nproc < 1:
        raise RunError(f"--nproc must be a positive number of processes, got {nproc}")
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "genspec", *argv]
    print(f"genspec: launching {nproc} processes: torchrun {' '.join(args)}", file=sys.stderr, flush=True)
    try:
        torchrun(args)
    except SystemExit as exc:  # torchrun exits through sys.exit
        return int(exc.code or 0)
    except Exception as exc:  # a worker's failure: its own message went to stderr
        print(f"genspec: a training process failed ({type(exc).__name__}); see the messages above", file=sys.stderr)
        return 1
    return 0


def setup(world: World, device_setting: str) -> torch.device:
    """Join the process group and choose this rank's device (cuda:LOCAL_RANK when CUDA is there)."""
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_setting != "cpu"
    device = torch.device(f"cuda:{world.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        check_gpu_count(world.local_size, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        # Left for the interpreter's teardown, gloo's worker threads can still hold tensors and
        # abort the process ("terminate called without an active exception", SIGABRT) after a
        # run that went well: the group is destroyed while Python is still whole.
        atexit.register(shutdown)
    return device


def check_gpu_count(processes_here: int, gpus: int) -> None:
    """One GPU per process (NCCL refuses two ranks on one GPU). Every rank of this machine checks
    the same numbers, so all of them stop with the same message rather than some hanging."""
    if processes_here > gpus:
        raise RunError(f"{processes_here} processes on this machine but {gpus} GPU{'s' if gpus != 1 else ''}: "
                       f"each process needs a GPU of its own; use --nproc {gpus} or fewer, "
                       f"or --set train.device=cpu to train with gloo on the CPU")


def check_batch_split(spec, world_size: int) -> None:
    """Every process needs an example of each global batch, and two under batch norm; said before
    anything starts (an empty share would only show up as a nan loss)."""
    size, needed = spec.train["batch_size"], world_size
    bn = batch_norm_network(spec.networks)
    if bn and world_size > 1:
        needed = 2 * world_size
    if size < needed:
        why = (f"batch norm (in networks.{bn}) needs 2 examples in each process's share"
               if bn and size >= world_size else f"{world_size - size} of them would get no example")
        raise RunError(f"train.batch_size {size} over {world_size} processes: {why}; use --set train.batch_size="
                       f"{needed} or more, or fewer processes")


def shard(x: torch.Tensor, y, world: World):
    """This rank's slice of a global batch (every world.size-th example)."""
    if not world.distributed:
        return x, y
    return x[world.rank::world.size], (None if y is None else y[world.rank::world.size])


class _Taps(nn.Module):
    """What DDP wraps: its forward is the network's `forward_taps` (a dict tap -> output, None
    the final output), the way genspec calls networks. Shares the network's parameters."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return self.net.forward_taps(*inputs)  # the compiled one where train.compile is on


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """One DistributedDataParallel wrapper for a network with trainable parameters; call it as
    `wrapper(*inputs)` for the network's taps."""
    from torch.nn.parallel import DistributedDataParallel

    # forward_sync_buffers=False (torch 2.14's name for broadcast_buffers=False): buffers are synced
    # once, when the wrapper is built, and not before every forward. Every buffer starts equal anyway
    # (train.prepare broadcasts rank 0's state); virtual batch norm's reference batches never change
    # after that; batch norm's running statistics are read only in eval mode, and only rank 0
    # evaluates and checkpoints (every rank resumes from its checkpoint), so broadcasting rank 0's
    # statistics before every forward (three times a step for VAE-GAN's discriminator) would cost a
    # collective each and change nothing that is evaluated or saved.
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"  # torch before 2.14
    return DistributedDataParallel(_Taps(net), device_ids=[device.index] if device.type == "cuda" else None,
                                   **{keyword: False})


def check_reached(where: str, net_name: str, params: list, spec=None) -> None:
    """After the backward pass of a wrapped network's objective: its trainable parameters got
    gradients all or none. Some without one would leave their DDP buckets unreduced (the other
    ranks' gradients not averaged in, and the next forward failing); say which rows."""
    missing = [name for name, p in params if p.grad is None]
    if not missing or len(missing) == len(params):
        return
    rows = sorted({int(name.split(".")[1]) for name in missing if name.startswith("rows.")})
    located = ""
    if spec is not None and rows:
        located = f"{spec.where('networks', net_name, 'layers', rows[0])}: networks.{net_name}.layers[{rows[0]}]: "
    rows_text = ", ".join(f"layers[{r}]" for r in rows) or ", ".join(missing)
    raise RunError(f"{located}{where} does not reach {len(missing)} of the {len(params)} trainable parameter tensors "
                   f"of network {net_name!r} ({rows_text}); with --nproc every trainable parameter of a network "
                   "must get a gradient from its objective in each step (DistributedDataParallel averages them), "
                   "so freeze those rows (`, frozen` in the row) or make the loss read them")


def average_gradients(params: list) -> None:
    """All-reduce the gradients of `params` to their mean over ranks, in one flat bucket (the
    parameters of trainable priors, which no DDP wrapper holds)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_tensors(tensors: list) -> None:
    """In-place mean over ranks (states such as BEGAN's k, running sums of losses)."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t /= dist.get_world_size()


def broadcast_module_state(modules: list) -> None:
    """Rank 0's parameters and buffers to every rank (same start; batch-norm statistics kept in step)."""
    import torch.distributed as dist

    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def agree(problem: Exception | None, world: World = SINGLE) -> None:
    """Raise `problem` here, and a stop on every other rank, if any rank has one: a rank that
    stopped alone would leave the others waiting in their next collective."""
    if not world.distributed:
        if problem is not None:
            raise problem
        return
    import torch.distributed as dist

    flag = torch.tensor([0.0 if problem is None else 1.0],
                        device=f"cuda:{world.local_rank}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem is not None:
        raise problem
    if flag.item() > 0:
        raise RunError("another process stopped the run (its own message above or below says why)")


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def shutdown() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        # The DistributedDataParallel wrappers of a finished run sit in reference cycles that only
        # the collector frees, and their reducers hold the group: collected at the interpreter's
        # teardown instead, the group's gloo threads are joined there and can abort the process.
        gc.collect()
        dist.destroy_process_group()
