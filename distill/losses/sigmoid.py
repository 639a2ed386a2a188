"""Sigmoid losses: SigLIP's pairwise task loss and the distillation of its pair probabilities.

Both losses score every (row i, column j) pair of the batch independently with
z_ij = t * a_i . b_j + bias and sum over the B x B pairs, normalised by the number of rows B
(SigLIP's normalisation). They declare `global_batch`, so under DDP the graph hands them the
batch gathered over all ranks (student rows with gradients, teacher rows without, and the
gathered `image_ids`) and every rank computes the same global loss. B is then the global
batch size, which is what makes the gradients equal single-process training on the whole
batch: the gather's backward all-reduces the W identical per-rank gradients and DDP's
averaging divides by W again (`distill/distributed.py`); a learnable t or bias gets the
same global gradient on every rank. Normalising by the local batch size instead would
scale the loss by W. SigLIP's own chunked implementation, which never materialises the
global B x B matrix, computes the same value; here each rank computes all B^2 pairs, which
costs memory and compute per rank, but no more than the softmax losses already do.
Under `trainer.local_loss` (`EdgeContext.rows`) a rank computes only its rows' pairs against
every column, |R| x B_global, and their share of the sum over the global B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    ArgumentError,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    local_positives,
    similarity_rows,
)
from distill.losses.ensemble import TeacherEnsemble, check_each, sigmoid_ensemble
from distill.registry import LOSSES


def _check_bias(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise ArgumentError(name, f"{name} must be a finite number, got {value}")


def _add_scale_and_bias(module: nn.Module, scale: float, bias: float, learnable: bool) -> None:
    """Give `module` t' = log t as `logit_scale` and the bias as `logit_bias`: parameters when
    learnable, else buffers. The names are InfoNCE's (and CLIP's): the LightningModule logs a
    learnable `logit_scale` as `train/temperature/<edge>` = 1/t, and both stay out of weight
    decay."""
    log_scale = torch.tensor(math.log(scale))
    bias_value = torch.tensor(float(bias))
    if learnable:
        module.logit_scale = nn.Parameter(log_scale)
        module.logit_bias = nn.Parameter(bias_value)
    else:
        module.register_buffer("logit_scale", log_scale)
        module.register_buffer("logit_bias", bias_value)


@LOSSES.register("siglip")
class SigLIP(EdgeLoss):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., ICCV 2023, arXiv 2303.15343).

    z_ij = t * a_i . b_j + bias,   y_ij = +1 if rows i and j show the same image, else -1,
    L = -(1/B) sum_i sum_j log sigmoid(y_ij z_ij),

    summed over all B x B pairs and divided by the number of rows B, as in the paper. The
    positives come from `image_ids`, so two captions of one image are never negatives of each
    other. t = exp(t') and the bias are learnable by default with SigLIP's initialisation
    (t = 10, i.e. t' = log 10, and bias = -10, which starts every pair near the negative
    prior); `learnable: false` fixes them at `scale` and `bias`. `scale` is t itself, a
    multiplier: InfoNCE's `temperature` is its inverse. There is no clamp on t (the paper describes
    none). When `a` and `b` differ in width, `a` is linearly projected to `b`'s width.

    Under DDP the loss sees the global batch (B = the global batch size); see the module
    docstring for why that gives the single-process gradients.
    """

    inputs = ("a", "b")
    same_dim = (("a", "b"),)
    projectable = True
    global_batch = True
    local_loss = True

    def __init__(self, *, scale: float = 10.0, bias: float = -10.0, learnable: bool = True) -> None:
        super().__init__()
        check_temperature(scale, "scale")
        _check_bias(bias, "bias")
        _add_scale_and_bias(self, scale, bias, learnable)

    def forward(self, a: Tensor, b: Tensor, *, ctx: EdgeContext) -> Tensor:
        a, b = as_float(self.project(a)), as_float(b)
        z = self.logit_scale.exp() * similarity_rows(a, b, ctx) + self.logit_bias
        signs = local_positives(ctx).float() * 2.0 - 1.0
        return -F.logsigmoid(signs * z).sum() / ctx.size


@LOSSES.register("sigmoid_kd")
class SigmoidKD(TeacherEnsemble):
    """Distillation of SigLIP's pair probabilities: a per-pair Bernoulli KL.

    With a = student and b = teacher embeddings,
        z^s_ij = t_s * a1_i . a2_j + bias_s,   z^t_ij = t_t * b1_i . b2_j + bias_t,
        p_ij = sigmoid(z^t_ij),   q_ij = sigmoid(z^s_ij),
        L = (1/B) sum_i sum_j [p_ij log(p_ij / q_ij) + (1 - p_ij) log((1 - p_ij) / (1 - q_ij))],
    summed over all B x B pairs and divided by the number of rows B, as the `siglip` task loss
    is. Each pair is its own binary distribution, as SigLIP treats it: no softmax couples the
    pairs of a row.

    Why the KL and not the binary cross-entropy with soft targets p: the two differ by the
    teacher's entropy H(p), a constant, so the student's gradients are identical; but the KL
    is 0 exactly when the student matches the teacher, so the logged `edge/<name>` value
    measures the remaining gap (as `similarity_kl`'s does) instead of being offset by B
    pairs' worth of teacher entropy. Both are computed through `logsigmoid`, stable for the
    large |z| that t = 10 and bias = -10 give.

    The teacher side uses fixed `teacher_scale` and `teacher_bias` (set them to the values a
    SigLIP teacher learnt; the defaults are SigLIP's initial t = 10 and bias = -10) and is
    detached. The student side uses `student_scale` and `student_bias`, fixed by default or
    learnable (initialised at those values) with `learnable: true`. Student and teacher
    widths may differ (both matrices are B x B). Under DDP the loss sees the global batch.

    Several teachers (the student pair, then one pair per teacher, each with its own scale
    t_k and bias c_k, as each SigLIP teacher learnt its own): the target of each pair is the
    weighted average of the teachers' Bernoulli probabilities,
        p_ij = sum_k w_k sigmoid(t_k * b^k_1i . b^k_2j + c_k),
    and L is the same per-pair KL to q_ij (the probabilities averaged, not the logits, as
    for the softmax losses; `distill.losses.ensemble.sigmoid_ensemble`).

    Args:
        student_scale, student_bias: t_s and bias_s (their initial values with `learnable`).
        teacher_scale: t_k: a number for every teacher, or one per teacher.
        teacher_bias: c_k: a number for every teacher, or one per teacher.
        teacher_weights: w_k >= 0, not all 0, one per teacher, normalised to sum 1; default equal.
        learnable: Learn the student's scale and bias.
    """

    global_batch = True
    local_loss = True
    per_teacher = {"teacher_scale": "teacher_scale", "teacher_bias": "teacher_bias"}

    def __init__(
        self,
        *,
        student_scale: float = 10.0,
        student_bias: float = -10.0,
        teacher_scale: float | list[float] = 10.0,
        teacher_bias: float | list[float] = -10.0,
        teacher_weights: list[float] | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        check_temperature(student_scale, "student_scale")
        _check_bias(student_bias, "student_bias")
        self.teacher_scale = check_each(teacher_scale, "teacher_scale", check_temperature)
        self.teacher_bias = check_each(teacher_bias, "teacher_bias", _check_bias)
        _add_scale_and_bias(self, student_scale, student_bias, learnable)
        self.init_teachers(teacher_weights)

    def forward(self, student_a: Tensor, student_b: Tensor, *teachers: Tensor, ctx: EdgeContext) -> Tensor:
        s = self.logit_scale.exp() * similarity_rows(as_float(student_a), as_float(student_b), ctx) + self.logit_bias
        with torch.no_grad():
            zs = []
            for (x, y), scale, bias in zip(self.teacher_pairs(teachers), self.each(self.teacher_scale),
                                           self.each(self.teacher_bias)):
                z = scale * similarity_rows(as_float(x.detach()), as_float(y.detach()), ctx)
                zs.append(z + bias)
            t = sigmoid_ensemble(zs, self.weights)
            p = torch.sigmoid(t)
            log_p, log_not_p = F.logsigmoid(t), F.logsigmoid(-t)
        kl = p * (log_p - F.logsigmoid(s)) + (1.0 - p) * (log_not_p - F.logsigmoid(-s))
        return kl.sum() / ctx.size
