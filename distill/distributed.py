"""Gathering the global batch across DDP ranks for losses that compare across the batch.

Every rank computes the *whole* global loss from the gathered embeddings. Gathering with
gradients uses an all-gather whose backward all-reduces (sums) the incoming gradient and
keeps the local slice: since each rank's loss is the same function of the same global
batch, each local slice receives W x dL/de_local, and DDP's gradient averaging over the W
ranks divides that back out, so parameter gradients equal single-process training on the
concatenated batch (the scaling pitfall of open_clip#616). Local batches may differ in size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


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
