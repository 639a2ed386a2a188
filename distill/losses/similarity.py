"""Relational distillation: matching in-batch similarity structure of teacher and student."""

from __future__ import annotations

from torch import Tensor

from distill.losses.base import (
    PAIR_SAME,
    PAIR_SLOTS,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    kl_per_row,
    local_positives,
    similarity_logits,
    similarity_rows,
)
from distill.registry import LOSSES


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

    Local mode (`EdgeContext.rows` = R): the KL of the rows i in R plus (with `columns`) that
    of the columns j in R (rows of the transposed matrices, b2[R] against every b1), over the
    global N; the masks of `exclude_self` come from the gathered image ids, so the block's
    diagonal (offset by R's start) and the copies on other ranks are excluded alike.
    """

    inputs = PAIR_SLOTS
    same_dim = PAIR_SAME
    global_batch = True
    local_loss = True
    schedulable = {"student_temperature": "tau_s", "teacher_temperature": "tau_t"}

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
        same = None
        if self.exclude_self:
            ids = ctx.image_ids
            if bool((ids == ids[0]).all()):  # then some row would have no pair left to compare
                raise ValueError("exclude_self needs at least two images in the batch")
            same = local_positives(ctx)
        s, s_cols = similarity_logits(as_float(student_a) / self.tau_s, as_float(student_b), ctx, same, self.columns)
        t, t_cols = similarity_logits(as_float(teacher_a) / self.tau_t, as_float(teacher_b), ctx, same, self.columns)
        loss = kl_per_row(t, s).sum() / ctx.size
        if s_cols is not None and t_cols is not None:
            loss = 0.5 * (loss + kl_per_row(t_cols, s_cols).sum() / ctx.size)
        return loss


@LOSSES.register("similarity_mse")
class SimilarityMSE(EdgeLoss):
    """Mean squared difference of the in-batch similarity matrices (ConaCLIP's SD).

    L = mean_ij (S(a1, a2)_ij - S(b1, b2)_ij)^2, e.g. MSE(S(SI, SI), S(TI, TI)) for the
    relational SI-SI edge or MSE(S(SI, ST), S(TI, TT)) for SI-ST (Wang et al. 2023).

    Local mode (`EdgeContext.rows` = R): the squared differences of the rows i in R, over the
    global N^2.
    """

    inputs = PAIR_SLOTS
    same_dim = PAIR_SAME
    global_batch = True
    local_loss = True

    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(
        self, student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, *, ctx: EdgeContext
    ) -> Tensor:
        s = similarity_rows(as_float(student_a), as_float(student_b), ctx)
        t = similarity_rows(as_float(teacher_a), as_float(teacher_b), ctx)
        return self.scale * (s - t).pow(2).sum() / ctx.size**2
