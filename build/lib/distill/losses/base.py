"""The base class of every loss edge and the helpers the loss families share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class EdgeContext:
    """What a loss may need besides its input embeddings.

    Attributes:
        image_ids: (B,) ids of the images of the rows, gathered over ranks when the loss
            declares `global_batch`; rows with the same id are positives of each other.
        keys: Sample keys of the local rows.
        extras: Per-batch extras other mechanisms attach (mined negatives, pair scorers).
    """

    image_ids: Tensor
    keys: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


class EdgeLoss(nn.Module):
    """A loss between graph nodes. Subclasses are registered in `LOSSES`.

    Class attributes:
        inputs: Names of the input slots; YAML `inputs:` lists node names in this order.
        same_dim: Groups of slots whose embeddings must have the same dimension.
        projectable: If true, slot 0 is linearly projected to slot 1's dimension when
            they differ (the projection is created by `setup` and trained).
        global_batch: If true, the graph hands the loss the batch gathered over all DDP
            ranks (trainable inputs with gradients, frozen ones without).
    """

    inputs: ClassVar[tuple[str, ...]] = ("a", "b")
    same_dim: ClassVar[tuple[tuple[str, ...], ...]] = (("a", "b"),)
    projectable: ClassVar[bool] = False
    global_batch: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.proj: nn.Module | None = None

    def dim_problem(self, dims: Mapping[str, int]) -> str | None:
        """Describe a dimension mismatch between slots, or None when the dims are usable."""
        for group in self.same_dim:
            found = {slot: dims[slot] for slot in group if slot in dims}
            if len(set(found.values())) > 1:
                if self.projectable and set(group) == set(self.inputs[:2]):
                    continue
                shown = ", ".join(f"{s}={d}" for s, d in found.items())
                return f"inputs have different dimensions ({shown}) and this loss has no projection"
        return None

    def setup(self, dims: Mapping[str, int]) -> None:
        """Create the learned projection when slot 0 and slot 1 differ in width."""
        a, b = self.inputs[0], self.inputs[1]
        if self.projectable and dims[a] != dims[b]:
            self.proj = nn.Linear(dims[a], dims[b], bias=False)

    def project(self, x: Tensor) -> Tensor:
        """Apply the projection (if any) to slot-0 embeddings and re-normalise."""
        if self.proj is None:
            return x
        return F.normalize(self.proj(x.to(self.proj.weight.dtype)), dim=-1)


def positive_mask(image_ids: Tensor) -> Tensor:
    """(B, B) bool: rows i and j describe the same image."""
    return image_ids[:, None] == image_ids[None, :]


def soft_targets(image_ids: Tensor) -> Tensor:
    """(B, B) float targets: uniform over each row's positives (one-hot without duplicates)."""
    pos = positive_mask(image_ids).float()
    return pos / pos.sum(1, keepdim=True)


def cross_entropy_soft(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log softmax(logits)_ij."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def as_float(x: Tensor) -> Tensor:
    """Losses are computed in float32 even under mixed precision."""
    return x.float()


class ArgumentError(ValueError):
    """A bad value of one constructor argument; the config check reports it at
    `edges.<edge>.args.<argument>`."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(message)


def check_temperature(value: float, name: str) -> None:
    """Temperatures must be positive and finite."""
    if not (value > 0 and math.isfinite(value)):
        raise ArgumentError(name, f"{name} must be a finite number > 0, got {value}")


__all__ = [
    "ArgumentError",
    "EdgeContext",
    "EdgeLoss",
    "as_float",
    "check_temperature",
    "cross_entropy_soft",
    "kl_rows",
    "positive_mask",
    "soft_targets",
]
