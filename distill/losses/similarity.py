"""Relational distillation: matching in-batch similarity structure of teacher and student.

Both losses read one teacher or an ensemble of several (`distill.losses.ensemble`): the
similarity KL averages the teachers' softmax probabilities, the similarity MSE their
similarity matrices.
"""

from __future__ import annotations

from torch import Tensor

from distill.losses.base import (
    EdgeContext,
    as_float,
    check_temperature,
    kl_per_row,
    local_positives,
    similarity_logits,
    similarity_rows,
)
from distill.losses.ensemble import (
    TeacherEnsemble,
    check_each,
    mean_ensemble,
    softmax_ensemble,
    teacher_slots,
)
from distill.registry import LOSSES


@LOSSES.register("similarity_kl")
class SimilarityKL(TeacherEnsemble):
    """KL between teacher and student in-batch similarity distributions.

    L_rows = mean_i KL(softmax(S(b1, b2)_i / tau_t) || softmax(S(a1, a2)_i / tau_s)),
    with a = student and b = teacher embeddings; with `columns: true` the same on the
    transposed matrices is added and the two are averaged. ConaCLIP's KL edges (Wang et al.
    2023), TinyCLIP's affinity mimicking (Wu et al. 2023), open_clip's DistillClipLoss.

    Several teachers: the inputs list the student pair, then one pair per teacher
    (`[student_a, student_b, teacher1_a, teacher1_b, teacher2_a, teacher2_b, ...]`), and the
    target is the weighted average of the teachers' distributions, the probabilities averaged
    as MobileCLIP does (Vasu et al., CVPR 2024):
        P_i = sum_k w_k softmax(S(b^k_1, b^k_2)_i / tau_k),   L_rows = mean_i KL(P_i || softmax(S(a1, a2)_i / tau_s)),
    the columns likewise from the teachers' column distributions. A temperature per teacher
    is MobileCLIP2's per-teacher logit scale (Faghri et al. 2025); each teacher pair needs one
    width within itself only. One teacher repeated K times is the one-teacher loss.

    With `exclude_self: true` the pairs of rows that show the same image (the diagonal, and
    the copies of an image that several of its captions bring into the batch) are left out
    of every softmax, as relational distillation usually does: in S(SI, SI) / tau the
    self-similarity 1 / tau dominates every row, so without the mask an intra-modal edge
    mostly teaches the student that an image resembles itself.

    Local mode (`EdgeContext.rows` = R): the KL of the rows i in R plus (with `columns`) that
    of the columns j in R (rows of the transposed matrices, b2[R] against every b1), over the
    global N; the masks of `exclude_self` come from the gathered image ids, so the block's
    diagonal (offset by R's start) and the copies on other ranks are excluded alike.

    Args:
        student_temperature: tau_s (schedulable).
        teacher_temperature: tau_k: a number for every teacher (schedulable), or one per teacher.
        teacher_weights: w_k >= 0, not all 0, one per teacher, normalised to sum 1; default equal.
        columns: Also distil the transposed direction (S^T), averaged with the rows.
        exclude_self: Mask the pairs that show the same image out of every softmax.
    """

    global_batch = True
    local_loss = True
    schedulable = {"student_temperature": "tau_s", "teacher_temperature": "tau_t"}
    per_teacher = {"teacher_temperature": "tau_t"}

    def __init__(
        self,
        *,
        student_temperature: float = 0.05,
        teacher_temperature: float | list[float] = 0.05,
        teacher_weights: list[float] | None = None,
        columns: bool = True,
        exclude_self: bool = False,
    ) -> None:
        super().__init__()
        check_temperature(student_temperature, "student_temperature")
        self.tau_s = student_temperature
        self.tau_t = check_each(teacher_temperature, "teacher_temperature", check_temperature)
        self.columns = columns
        self.exclude_self = exclude_self
        self.init_teachers(teacher_weights)

    def forward(self, student_a: Tensor, student_b: Tensor, *teachers: Tensor, ctx: EdgeContext) -> Tensor:
        pairs = self.teacher_pairs(teachers)
        same = None
        if self.exclude_self:
            ids = ctx.image_ids
            if bool((ids == ids[0]).all()):  # then some row would have no pair left to compare
                raise ValueError("exclude_self needs at least two images in the batch")
            same = local_positives(ctx)
        s, s_cols = similarity_logits(as_float(student_a) / self.tau_s, as_float(student_b), ctx, same, self.columns)
        ts = [similarity_logits(as_float(x) / tau, as_float(y), ctx, same, self.columns)
              for (x, y), tau in zip(pairs, self.each(self.tau_t))]
        t = softmax_ensemble([rows for rows, _ in ts], self.weights)
        loss = kl_per_row(t, s).sum() / ctx.size
        if s_cols is not None:
            t_cols = softmax_ensemble([cols for _, cols in ts if cols is not None], self.weights)
            loss = 0.5 * (loss + kl_per_row(t_cols, s_cols).sum() / ctx.size)
        return loss


@LOSSES.register("similarity_kl_ensemble")
class SimilarityKLEnsemble(SimilarityKL):
    """`similarity_kl` with 2 or more teachers, under the name it had before every similarity
    loss took an ensemble; kept so that configs using it run unchanged. New configs: write
    `loss: similarity_kl` with the same inputs and `teacher_temperature: [...]`.

    Differences from `similarity_kl`: the per-teacher temperatures are `teacher_temperatures`
    (a list; default 0.05 each); an edge lists at least two teacher pairs (two unless it lists
    more); only `student_temperature` can be scheduled.
    """

    inputs = ("student_a", "student_b", *teacher_slots(2))
    same_dim = (("student_a", "student_b"), ("teacher1_a", "teacher1_b"), ("teacher2_a", "teacher2_b"))
    schedulable = {"student_temperature": "tau_s"}
    per_teacher = {"teacher_temperatures": "tau_t"}
    min_teachers = 2

    def __init__(
        self,
        *,
        student_temperature: float = 0.05,
        teacher_temperatures: list[float] | None = None,
        teacher_weights: list[float] | None = None,
        columns: bool = True,
        exclude_self: bool = False,
    ) -> None:
        if teacher_temperatures is not None:  # reported under this loss's name for them
            check_each(teacher_temperatures, "teacher_temperatures", check_temperature)
        super().__init__(student_temperature=student_temperature,
                         teacher_temperature=0.05 if teacher_temperatures is None else teacher_temperatures,
                         teacher_weights=teacher_weights, columns=columns, exclude_self=exclude_self)


@LOSSES.register("similarity_mse")
class SimilarityMSE(TeacherEnsemble):
    """Mean squared difference of the in-batch similarity matrices (ConaCLIP's SD).

    L = mean_ij (S(a1, a2)_ij - S(b1, b2)_ij)^2, e.g. MSE(S(SI, SI), S(TI, TI)) for the
    relational SI-SI edge or MSE(S(SI, ST), S(TI, TT)) for SI-ST (Wang et al. 2023).

    Several teachers (the student pair, then one pair per teacher): the target is the
    weighted average of the teachers' similarity matrices, T = sum_k w_k S(b^k_1, b^k_2), and
    L = mean_ij (S(a1, a2)_ij - T_ij)^2. The matrices are averaged as they are (cosines, no
    temperature): teachers whose cosines span different ranges pull the target towards the
    wider one, which `teacher_weights` can offset.

    Local mode (`EdgeContext.rows` = R): the squared differences of the rows i in R, over the
    global N^2.

    Args:
        scale: A multiplier of the loss.
        teacher_weights: w_k >= 0, not all 0, one per teacher, normalised to sum 1; default equal.
    """

    global_batch = True
    local_loss = True

    def __init__(self, *, scale: float = 1.0, teacher_weights: list[float] | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.init_teachers(teacher_weights)

    def forward(self, student_a: Tensor, student_b: Tensor, *teachers: Tensor, ctx: EdgeContext) -> Tensor:
        s = similarity_rows(as_float(student_a), as_float(student_b), ctx)
        t = mean_ensemble([similarity_rows(as_float(x), as_float(y), ctx) for x, y in self.teacher_pairs(teachers)],
                          self.weights)
        return self.scale * (s - t).pow(2).sum() / ctx.size**2
