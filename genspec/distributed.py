"""Data-parallel training across processes: `genspec run SPEC --nproc N` (torchrun).

`launch` re-runs the same command under `torch.distributed.run`; each process then calls
`setup`, which joins the process group (NCCL on GPUs, gloo on CPU) and picks its device. Every
rank trains on its own slice of each global batch (the DistributedSampler idea applied to
genspec's tensor batches), gradients are averaged across ranks before the optimisers step, and
only rank 0 evaluates and writes the run folder.

Why not one DistributedDataParallel wrapper per network: a genspec step runs one forward pass
and then several backward passes (one per objective, `backward(inputs=...)`, with the graph
retained between them: VAE-GAN's Algorithm 1). DDP's reducer assumes one backward per forward
and would need `find_unused_parameters` and a forward per objective. Averaging each objective's
gradients in flat buckets after its backward passes is the same arithmetic as DDP's all-reduce,
without its overlap of communication and computation.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .errors import RunError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

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
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


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
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def shard(x: torch.Tensor, y, world: World):
    """This rank's slice of a global batch (every world.size-th example)."""
    if not world.distributed:
        return x, y
    return x[world.rank::world.size], (None if y is None else y[world.rank::world.size])


def average_gradients(params: list) -> None:
    """All-reduce the gradients of `params` to their mean over ranks, in one flat bucket."""
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
        raise RunError(f"rank {world.rank}: another process stopped the run (rank 0 reports why)")


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
