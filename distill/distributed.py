"""Which process am I, waiting for the others, and gathering the global batch under DDP.

Every question of rank goes through `rank`, `world_size`, `is_rank_zero` and `barrier`:
the process group once one exists, else the launcher's environment (torchrun's `RANK`,
SLURM's `SLURM_PROCID`, Lightning's `NODE_RANK`/`LOCAL_RANK` in the processes it spawns).

Gathering the global batch for losses that compare across the batch:

Every rank computes the *whole* global loss from the gathered embeddings. Gathering with
gradients uses an all-gather whose backward all-reduces (sums) the incoming gradient and
keeps the local slice: since each rank's loss is the same function of the same global
batch, each local slice receives W x dL/de_local, and DDP's gradient averaging over the W
ranks divides that back out, so parameter gradients equal single-process training on the
concatenated batch (the scaling pitfall of open_clip#616). Local batches may differ in size.

Under `trainer.local_loss` each rank instead computes only its own rows' share L_r of the
global loss L = sum_r L_r (rows of the rank against every gathered column, open_clip's
`local_loss`): the backward's sum then gives each local slice dL/de_local exactly, and the
graph trains on W x L_r so that DDP's averaging again yields the single-process gradient
(`distill.core.graph.KnowledgeGraph.forward`).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when no group is initialised)."""
    return dist.get_world_size() if _grouped() else 1


def rank() -> int:
    """This process's global rank: the group's, else the launcher's environment, else 0."""
    if _grouped():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return local if node == 0 else node * int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)) + local


def local_rank() -> int:
    """This process's rank on its node (which GPU it drives): `LOCAL_RANK`, `SLURM_LOCALID`, else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def launch_world() -> int:
    """Processes the launcher started: the group's size, else `WORLD_SIZE`, else 1."""
    return dist.get_world_size() if _grouped() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank_zero() -> bool:
    """True on exactly one process: the one that writes shared files and prints results."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process of the group gets here (nothing to wait for without a group)."""
    if _grouped() and dist.get_world_size() > 1:
        dist.barrier()


def join_launch_group(timeout: timedelta = timedelta(hours=12)) -> tuple[int, int]:
    """Outside Lightning (e.g. `torchrun -m distill cache`): join the launcher's process group
    (gloo, which serves barriers on any device) and return (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not _grouped():
        dist.init_process_group("gloo", timeout=timeout)
    return rank(), launch_world()


def _pad_gather(x: Tensor, sizes: list[int]) -> Tensor:
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def batch_sizes(n: int, device: torch.device) -> list[int]:
    """The local batch size of every rank, in rank order."""
    if world_size() == 1:
        return [n]
    local = torch.tensor([n], device=device, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return [int(p.item()) for p in parts]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _pad_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def sum_over_ranks(x: Tensor) -> Tensor:
    """The sum of `x` over every rank, detached (for values that are logged, not trained);
    `x` itself when not distributed."""
    x = x.detach()
    if world_size() == 1:
        return x
    total = x.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather(x: Tensor, sizes: list[int], *, with_grad: bool) -> Tensor:
    """Concatenate `x` from every rank (rank order); identity when not distributed.

    Args:
        x: The local rows.
        sizes: Every rank's number of rows (from `batch_sizes`).
        with_grad: Let gradients flow back to the local rows (trainable nodes).
    """
    if world_size() == 1:
        return x
    if with_grad and x.requires_grad:
        return _GatherWithGrad.apply(x, sizes)
    with torch.no_grad():
        return _pad_gather(x.detach(), sizes)


def average_gradients(params: list[Tensor]) -> None:
    """Average `.grad` of `params` over the ranks in place, as DDP's reducer does after a backward
    (a missing gradient counts as zeros, so every rank reduces the same list; one all-reduce
    per dtype and device). Used where the backward passes ran without DDP's reducer
    (exact accumulation: `distill.training.module`); nothing when not distributed."""
    world = world_size()
    if world == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))
