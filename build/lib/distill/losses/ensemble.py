"""Distribution distillation from an ensemble of two teachers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import ArgumentError, EdgeContext, EdgeLoss, as_float, check_temperature
from distill.registry import LOSSES


def kl_to_mixture(probs: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(probs || softmax(student_logits)) for a target distribution `probs`."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (torch.xlogy(probs, probs) - probs * log_q).sum(-1).mean()


@LOSSES.register("similarity_kl_ensemble")
class SimilarityKLEnsemble(EdgeLoss):
    """KL from the average of two teachers' similarity distributions to the student's.

    With a = student and b^k = teacher k embeddings, w_k >= 0 summing to 1 and a
    temperature per teacher,
        P_i = sum_k w_k softmax(S(b^k_1, b^k_2)_i / tau_k),
        L_rows = mean_i KL(P_i || softmax(S(a1, a2)_i / tau_s)),
    and with `columns: true` the same on the transposed matrices, averaged with the rows.
    The probabilities are averaged, not the logits, as MobileCLIP does for its CLIP teacher
    ensemble (Vasu et al., CVPR 2024, arXiv 2311.17049). Each teacher pair needs equal
    widths within itself only, so e.g. a 256-wide CLIP text tower and a 384-wide MiniLM
    can teach one 128-wide student's relational text structure.
    """

    inputs = ("student_a", "student_b", "teacher1_a", "teacher1_b", "teacher2_a", "teacher2_b")
    same_dim = (("student_a", "student_b"), ("teacher1_a", "teacher1_b"), ("teacher2_a", "teacher2_b"))
    global_batch = True

    def __init__(
        self,
        *,
        student_temperature: float = 0.05,
        teacher_temperatures: list[float] | None = None,
        teacher_weights: list[float] | None = None,
        columns: bool = True,
    ) -> None:
        super().__init__()
        temps = list(teacher_temperatures) if teacher_temperatures is not None else [0.05, 0.05]
        weights = list(teacher_weights) if teacher_weights is not None else [0.5, 0.5]
        if len(temps) != 2 or len(weights) != 2:
            raise ValueError("teacher_temperatures and teacher_weights take one value per teacher (2)")
        check_temperature(student_temperature, "student_temperature")
        for t in temps:
            check_temperature(t, "teacher_temperatures")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ArgumentError("teacher_weights", f"teacher_weights must be >= 0 with a positive sum, got {weights}")
        self.tau_s, self.tau_t = student_temperature, temps
        self.weights = [w / sum(weights) for w in weights]
        self.columns = columns

    def forward(
        self, student_a: Tensor, student_b: Tensor, teacher1_a: Tensor, teacher1_b: Tensor,
        teacher2_a: Tensor, teacher2_b: Tensor, *, ctx: EdgeContext,
    ) -> Tensor:
        s = as_float(student_a) @ as_float(student_b).t() / self.tau_s
        teachers = [as_float(x) @ as_float(y).t() / tau
                    for (x, y), tau in zip(((teacher1_a, teacher1_b), (teacher2_a, teacher2_b)), self.tau_t)]
        rows = sum(w * t.softmax(-1) for w, t in zip(self.weights, teachers))
        loss = kl_to_mixture(rows, s)  # type: ignore[arg-type]
        if self.columns:
            cols = sum(w * t.t().softmax(-1) for w, t in zip(self.weights, teachers))
            loss = 0.5 * (loss + kl_to_mixture(cols, s.t()))  # type: ignore[arg-type]
        return loss


__all__ = ["SimilarityKLEnsemble", "kl_to_mixture"]
