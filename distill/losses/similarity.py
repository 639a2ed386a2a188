"""Relational distillation: matching in-batch similarity structure of teacher and student."""

from __future__ import annotations

from torch import Tensor

from distill.losses.base import (
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    kl_rows,
    positive_mask,
)
from distill.registry import LOSSES

_SLOTS = ("student_a", "student_b", "teacher_a", "teacher_b")
_SAME = (("student_a", "student_b"), ("teacher_a", "teacher_b"))


@LOSSES.register("similarity_kl")
class SimilarityKL(EdgeLoss):
    """KL between teacher and student in-batch similarity distributions.

    L_rows = mean_i KL(softmax(S(b1, b2)_i / tau_t) || softmax(S(a1, a2)_i / tau_s)),
    with a = student and b = teacher embeddings; with `columns: true` the same on the
    transposed matrices is added and the two are averaged. ConaCLIP's KL edges (Wang et al.
    2023), TinyCLIP's affinity mimicking (Wu et al. 2023), open_clip's DistillClipLoss.

    With `exclude_self: true` the pairs of rows that show the same image (the diagonal, and
    the copies of an image that several of its captions bring into the batch) are left out
    of both softmaxes, as relational distillation usually does: in S(SI, SI) / tau the
    self-similarity 1 / tau dominates every row, so without the mask an intra-modal edge
    mostly teaches the student that an image resembles itself.
    """

    inputs = _SLOTS
    same_dim = _SAME
    global_batch = True

    def __init__(
        self,
        *,
        student_temperature: float = 0.05,
        teacher_temperature: float = 0.05,
        columns: bool = True,
        exclude_self: bool = False,
    ) -> None:
        super().__init__()
        check_temperature(student_temperature, "student_temperature")
        check_temperature(teacher_temperature, "teacher_temperature")
        self.tau_s = student_temperature
        self.tau_t = teacher_temperature
        self.columns = columns
        self.exclude_self = exclude_self

    def forward(
        self, student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, *, ctx: EdgeContext
    ) -> Tensor:
        s = as_float(student_a) @ as_float(student_b).t() / self.tau_s
        t = as_float(teacher_a) @ as_float(teacher_b).t() / self.tau_t
        if self.exclude_self:
            same = positive_mask(ctx.image_ids)
            if not (~same).any(1).all():
                raise ValueError("exclude_self needs at least two images in the batch")
            s, t = s.masked_fill(same, -1e4), t.masked_fill(same, -1e4)  # exp underflows to 0: out of both softmaxes
        loss = kl_rows(t, s)
        if self.columns:
            loss = 0.5 * (loss + kl_rows(t.t(), s.t()))
        return loss


@LOSSES.register("similarity_mse")
class SimilarityMSE(EdgeLoss):
    """Mean squared difference of the in-batch similarity matrices (ConaCLIP's SD).

    L = mean_ij (S(a1, a2)_ij - S(b1, b2)_ij)^2, e.g. MSE(S(SI, SI), S(TI, TI)) for the
    relational SI-SI edge or MSE(S(SI, ST), S(TI, TT)) for SI-ST (Wang et al. 2023).
    """

    inputs = _SLOTS
    same_dim = _SAME
    global_batch = True

    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(
        self, student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, *, ctx: EdgeContext
    ) -> Tensor:
        s = as_float(student_a) @ as_float(student_b).t()
        t = as_float(teacher_a) @ as_float(teacher_b).t()
        return self.scale * (s - t).pow(2).mean()
