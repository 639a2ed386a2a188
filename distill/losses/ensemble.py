"""Distribution distillation from an ensemble of teachers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import (
    ArgumentError,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    local_positives,
    similarity_logits,
)
from distill.registry import LOSSES

_STUDENT = ("student_a", "student_b")


def teacher_slots(n: int) -> tuple[str, ...]:
    """`teacher1_a, teacher1_b, ..., teacher<n>_a, teacher<n>_b`."""
    return tuple(f"teacher{k}_{side}" for k in range(1, n + 1) for side in "ab")


def mixture(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k softmax(logits_k) over the last dimension: the ensemble's target distribution."""
    return sum(w * x.float().softmax(-1) for w, x in zip(weights, logits))  # type: ignore[return-value]


def kl_to_mixture(probs: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(probs || softmax(student_logits)) for a target distribution `probs`."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (torch.xlogy(probs, probs) - probs * log_q).sum(-1).mean()


@LOSSES.register("similarity_kl_ensemble")
class SimilarityKLEnsemble(EdgeLoss):
    """KL from the weighted average of several teachers' similarity distributions to the student's.

    Inputs: the student pair, then one pair per teacher (2 or more teachers):
    `[student_a, student_b, teacher1_a, teacher1_b, teacher2_a, teacher2_b, ...]`. With
    a = student and b^k = teacher k embeddings, a temperature tau_k and a weight w_k per
    teacher (the weights are normalised to sum to 1),
        P_i = sum_k w_k softmax(S(b^k_1, b^k_2)_i / tau_k),
        L_rows = mean_i KL(P_i || softmax(S(a1, a2)_i / tau_s)),
    and with `columns: true` the same on the transposed matrices, averaged with the rows;
    `exclude_self: true` leaves the pairs of rows that show the same image out of every
    softmax, as in `similarity_kl`. The probabilities are averaged, not the logits, as
    MobileCLIP does for its CLIP teacher ensemble (Vasu et al., CVPR 2024, arXiv 2311.17049);
    a temperature per teacher plays the part of MobileCLIP2's per-teacher logit scales
    (Faghri et al. 2025). Each teacher pair needs equal widths within itself
    only, so e.g. a 256-wide CLIP text tower and a 384-wide MiniLM can teach one 128-wide
    student's relational text structure.

    What reads an ensemble: this edge is the similarity KL (`similarity_kl`) with an
    ensemble target, rows and columns; with one teacher repeated it equals `similarity_kl`.
    The other in-batch losses (`infonce`, `similarity_mse`, `sigmoid_kd`) take one teacher:
    use one edge per teacher with its own weight, or build their targets from `mixture`.

    Args:
        student_temperature: tau_s (schedulable: `{schedule: ..., ...}`).
        teacher_temperatures: tau_k, one per teacher; default 0.05 each.
        teacher_weights: w_k >= 0, not all 0, one per teacher; default equal.
        columns: Also distil the transposed direction (S^T), averaged with the rows.
        exclude_self: Mask the pairs that show the same image out of every softmax.
    """

    inputs = (*_STUDENT, *teacher_slots(2))  # two teachers unless the edge lists more
    same_dim = (_STUDENT, ("teacher1_a", "teacher1_b"), ("teacher2_a", "teacher2_b"))
    global_batch = True
    local_loss = True  # rows R: their KL and (columns) that of columns R, over the global N
    schedulable = {"student_temperature": "tau_s"}

    def __init__(
        self,
        *,
        student_temperature: float = 0.05,
        teacher_temperatures: list[float] | None = None,
        teacher_weights: list[float] | None = None,
        columns: bool = True,
        exclude_self: bool = False,
    ) -> None:
        super().__init__()
        check_temperature(student_temperature, "student_temperature")
        given = {"teacher_temperatures": teacher_temperatures, "teacher_weights": teacher_weights}
        for name, values in given.items():
            if values is not None and len(values) < 2:
                raise ArgumentError(name, f"{name} takes one value per teacher and an ensemble has at least 2 "
                                          f"teachers (for one, use similarity_kl), got {len(values)}")
        if teacher_temperatures is not None and teacher_weights is not None \
                and len(teacher_temperatures) != len(teacher_weights):
            raise ArgumentError("teacher_weights", f"teacher_weights takes one value per teacher: got "
                                f"{len(teacher_weights)} for {len(teacher_temperatures)} teacher_temperatures")
        for i, t in enumerate(teacher_temperatures or []):
            check_temperature(t, f"teacher_temperatures[{i}]")
        for i, w in enumerate(teacher_weights or []):
            if not (math.isfinite(w) and w >= 0):
                raise ArgumentError(f"teacher_weights[{i}]", f"teacher_weights[{i}] must be a finite number >= 0, got {w}")
        if teacher_weights is not None and sum(teacher_weights) <= 0:
            raise ArgumentError("teacher_weights", f"teacher_weights must not all be 0, got {teacher_weights}")
        self.given = {name: list(v) for name, v in given.items() if v is not None}
        self.tau_s = student_temperature
        self.columns, self.exclude_self = columns, exclude_self
        self._teachers(len(teacher_temperatures or teacher_weights or [0, 0]))

    def _teachers(self, n: int) -> None:
        """Per-teacher temperatures and normalised weights for `n` teachers (defaults where not given)."""
        self.tau_t = self.given.get("teacher_temperatures", [0.05] * n)
        weights = self.given.get("teacher_weights", [1.0] * n)
        self.weights = [w / sum(weights) for w in weights]

    @classmethod
    def slots(cls, n: int) -> tuple[str, ...] | None:
        if n < 6 or n % 2:
            return None
        return (*_STUDENT, *teacher_slots((n - 2) // 2))

    @classmethod
    def takes(cls) -> str:
        return f"the student pair then 2 or more teacher pairs ({', '.join(cls.inputs)}, ...)"

    def bind(self, slots: tuple[str, ...]) -> None:
        """Take the number of teachers from the edge's inputs; lists given must have one value each."""
        n = (len(slots) - 2) // 2
        for name, values in self.given.items():
            if len(values) != n:
                raise ArgumentError(name, f"{name} takes one value per teacher: the inputs list {n} teacher "
                                          f"pairs, got {len(values)} values")
        self._teachers(n)
        self.inputs = slots  # type: ignore[misc]  # this edge's slots
        self.same_dim = (_STUDENT, *zip(slots[2::2], slots[3::2]))  # type: ignore[misc]

    def forward(self, student_a: Tensor, student_b: Tensor, *teachers: Tensor, ctx: EdgeContext) -> Tensor:
        if len(teachers) != 2 * len(self.tau_t):
            raise ValueError(f"similarity_kl_ensemble has {len(self.tau_t)} teachers, got {len(teachers)} teacher inputs")
        same = None
        if self.exclude_self:
            ids = ctx.image_ids
            if bool((ids == ids[0]).all()):  # then some row would have no pair left to compare
                raise ValueError("exclude_self needs at least two images in the batch")
            same = local_positives(ctx)  # out of every softmax
        s, s_cols = similarity_logits(as_float(student_a) / self.tau_s, as_float(student_b), ctx, same, self.columns)
        ts = [similarity_logits(as_float(x) / tau, as_float(y), ctx, same, self.columns)
              for x, y, tau in zip(teachers[0::2], teachers[1::2], self.tau_t)]
        share = s.shape[0] / ctx.size  # a mean over these rows -> their part of the mean over all N
        loss = kl_to_mixture(mixture([t for t, _ in ts], self.weights), s) * share
        if s_cols is not None:
            cols = [c for _, c in ts if c is not None]
            loss = 0.5 * (loss + kl_to_mixture(mixture(cols, self.weights), s_cols) * share)
        return loss


__all__ = ["SimilarityKLEnsemble", "kl_to_mixture", "mixture", "teacher_slots"]
