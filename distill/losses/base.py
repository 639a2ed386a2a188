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
        rows: Under `trainer.local_loss` (a loss that declares `local_loss`), this rank's rows
            within the gathered batch; the loss then returns only those rows' share of the
            global value (see `EdgeLoss`). None: the whole batch, as without DDP.
    """

    image_ids: Tensor
    keys: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    rows: slice | None = None

    @property
    def size(self) -> int:
        """N, the number of rows of the (gathered) batch: what per-row terms are averaged over."""
        return int(self.image_ids.shape[0])

    @property
    def offset(self) -> int:
        """Where this rank's rows start in the gathered batch (0 for the whole batch)."""
        return 0 if self.rows is None else int(self.rows.start or 0)

    def local(self, x: Tensor) -> Tensor:
        """The rows of `x` (a gathered tensor) this call computes: `x[rows]`, or all of `x`."""
        return x if self.rows is None else x[self.rows]


PAIR_SLOTS = ("student_a", "student_b", "teacher_a", "teacher_b")
"""The inputs of a distribution-matching edge: a student pair and the teacher pair it learns."""
PAIR_SAME = (("student_a", "student_b"), ("teacher_a", "teacher_b"))
"""Each pair's two ends share a width (the student and teacher widths may differ)."""

class EdgeLoss(nn.Module):
    """A loss between graph nodes. Subclasses are registered in `LOSSES`.

    Class attributes:
        inputs: Names of the input slots; YAML `inputs:` lists node names in this order.
        same_dim: Groups of slots whose embeddings must have the same dimension.
        projectable: If true, slot 0 is linearly projected to slot 1's dimension when
            they differ (the projection is created by `setup` and trained).
        global_batch: If true, the graph hands the loss the batch gathered over all DDP
            ranks (trainable inputs with gradients, frozen ones without).
        local_loss: If true, the loss honours `EdgeContext.rows` (`trainer.local_loss`): given
            the gathered inputs, it computes only the terms of this rank's rows, so that the
            values over a partition of the rows sum to the loss of the whole batch (a mean
            over rows is then each row's term over the global N; the column terms of a
            symmetric loss are those of the rank's columns, the rows of the transposed
            matrix). Each rank then holds B_local x B_global matrices instead of
            B_global x B_global. False (the default, e.g. a plugin written before the mode
            existed): the graph computes the whole loss on every rank, as without the mode.
        schedulable: Fixed temperature-like constructor arguments that YAML may give as a
            schedule over training steps (`{schedule: linear, start: 0.1, end: 0.05, steps:
            500}`, `distill.core.schedule`), each mapped to the attribute `forward` reads it
            from; the graph sets it through `set_argument` before every step.
        reads: Slots that take layer nodes (`student.text.hidden[2]`, see
            `distill.models.intermediate`) -> the layer kinds they accept; every other slot
            takes an embedding (or a pair) node. Token-level losses: `distill.losses.tokens`.
    """

    inputs: ClassVar[tuple[str, ...]] = ("a", "b")
    same_dim: ClassVar[tuple[tuple[str, ...], ...]] = (("a", "b"),)
    projectable: ClassVar[bool] = False
    global_batch: ClassVar[bool] = True
    local_loss: ClassVar[bool] = False
    schedulable: ClassVar[Mapping[str, str]] = {}
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.proj: nn.Module | None = None

    @classmethod
    def slots(cls, n: int) -> tuple[str, ...] | None:
        """The slot names of an edge that lists `n` input nodes, or None when the loss takes
        no such number: `inputs` for exactly `len(inputs)` (a loss with a variable number of
        inputs overrides this, `takes` and `bind`, as `distill.losses.ensemble.TeacherEnsemble`
        does for the losses that read N teacher pairs)."""
        return cls.inputs if n == len(cls.inputs) else None

    @classmethod
    def takes(cls) -> str:
        """What the loss takes as inputs, for the config check's message."""
        return f"{len(cls.inputs)} inputs ({', '.join(cls.inputs)})"

    def bind(self, slots: tuple[str, ...]) -> None:
        """Called with the edge's slot names (`slots(len(inputs))`) before `dim_problem` and
        `setup`; a loss with a variable number of inputs checks its arguments against them
        here (raising `ArgumentError`). Nothing to do for a fixed number of inputs."""

    def set_argument(self, name: str, value: float) -> None:
        """Set the scheduled argument `name` (a key of `schedulable`) to its value at this step.

        Raises:
            ArgumentError: A value the constructor would refuse too.
        """
        check_temperature(value, name)
        setattr(self, self.schedulable[name], float(value))

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

    def layer_problem(self, layers: Mapping[str, Any]) -> str | None:
        """Why the layer nodes bound to the `reads` slots (a `LayerRead` each) cannot be
        compared, or None; the config check calls it once per layer pair."""
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


def positive_mask(image_ids: Tensor, column_ids: Tensor | None = None) -> Tensor:
    """(B, C) bool: row i and column j describe the same image (columns: `image_ids` itself
    unless `column_ids` are given)."""
    return image_ids[:, None] == (image_ids if column_ids is None else column_ids)[None, :]


def soft_targets(image_ids: Tensor, column_ids: Tensor | None = None) -> Tensor:
    """(B, C) float targets: uniform over each row's positives (one-hot without duplicates)."""
    pos = positive_mask(image_ids, column_ids).float()
    return pos / pos.sum(1, keepdim=True)


def local_positives(ctx: EdgeContext) -> Tensor:
    """(B_rows, N) bool: positives of the rows `ctx` computes among all N rows of the batch
    (the same mask serves the transposed blocks: it is symmetric)."""
    return positive_mask(ctx.local(ctx.image_ids), ctx.image_ids)


def similarity_rows(x: Tensor, y: Tensor, ctx: EdgeContext) -> Tensor:
    """The rows of S = x y^T that `ctx` computes: |R| x N (all of S for the whole batch)."""
    return ctx.local(x) @ y.t()


def similarity_blocks(x: Tensor, y: Tensor, ctx: EdgeContext) -> tuple[Tensor, Tensor]:
    """The rows of S = x y^T that `ctx` computes, and the same rows of S^T (S's columns).

    Whole batch: (S, S^T as a view). Local rows R: (x[R] y^T, y[R] x^T), each |R| x N, so
    that a loss's column terms are computed for the rank's own columns.
    """
    if ctx.rows is None:
        s = x @ y.t()
        return s, s.t()
    return ctx.local(x) @ y.t(), ctx.local(y) @ x.t()


def similarity_logits(
    x: Tensor, y: Tensor, ctx: EdgeContext, same: Tensor | None, columns: bool
) -> tuple[Tensor, Tensor | None]:
    """The rows of S(x, y) that `ctx` computes and, with `columns`, the same rows of S^T; the
    pairs of `same` (from `local_positives`, or None) are filled with -1e4, so that exp
    underflows to 0 and they drop out of the softmaxes (the mask is symmetric: it serves
    both blocks)."""

    def fill(m: Tensor) -> Tensor:
        return m if same is None else m.masked_fill(same, -1e4)

    if not columns:
        return fill(similarity_rows(x, y, ctx)), None
    rows, cols = similarity_blocks(x, y, ctx)
    if ctx.rows is None:  # cols is a view of rows: mask once
        rows = fill(rows)
        return rows, rows.t()
    return fill(rows), fill(cols)


def cross_entropy_soft_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row: -sum_j targets_ij * log softmax(logits)_ij."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def cross_entropy_soft(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log softmax(logits)_ij."""
    return cross_entropy_soft_rows(logits, targets).mean()


def kl_per_row(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per row: KL(softmax(teacher) || softmax(student))."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    return kl_per_row(teacher_logits, student_logits).mean()


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
    "cross_entropy_soft_rows",
    "kl_per_row",
    "kl_rows",
    "local_positives",
    "positive_mask",
    "similarity_blocks",
    "similarity_logits",
    "similarity_rows",
    "soft_targets",
]
