"""Contrastive losses: InfoNCE and the VSE++ hardest-negative triplet loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.losses.base import (
    ArgumentError,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    cross_entropy_soft_rows,
    local_positives,
    similarity_blocks,
    soft_targets,
)
from distill.registry import LOSSES


@LOSSES.register("infonce")
class InfoNCE(EdgeLoss):
    """Symmetric InfoNCE between two sets of embeddings (CLIP, Radford et al. 2021).

    L = 1/2 [CE(S(a, b) / tau) + CE(S(b, a) / tau)],  S(x, y) = x y^T,

    where the targets of row i are uniform over every row j with the same image id, so
    two captions of one image are never negatives of each other. `tau` is fixed, or
    learnable as CLIP's logit scale 1/tau (initialised at 1/temperature, clamped at
    `max_logit_scale`). When `a` and `b` differ in width, `a` is linearly projected to
    `b`'s width. Serves the task edge (SI-ST), cross-modal teacher-student edges (SI-TT,
    ST-TI) and intra-modal contrastive distillation (SI-TI; Ren and Zhu, NAACL 2022).

    Reads no teacher ensemble: the targets come from the image ids, and a teacher node in
    `b` is an anchor space, not a target distribution (teachers of other widths share no
    space to average anchors in). Several teachers: one edge per teacher, each with its own
    `weight`; their ensemble's in-batch distribution: `similarity_kl` with one pair per
    teacher (`distill.losses.ensemble`).

    Local mode (`EdgeContext.rows` = R): sum_{i in R} CE_i(S(a, b)) + sum_{j in R} CE_j(S(b, a)),
    halved and over the global N: the rows of the rank's `a` against every `b` and the rows
    of its `b` against every `a`.
    """

    inputs = ("a", "b")
    same_dim = (("a", "b"),)
    projectable = True
    global_batch = True
    local_loss = True
    schedulable = {"temperature": "logit_scale"}  # a fixed one only: stored as log(1/tau)

    def __init__(
        self, *, temperature: float = 0.07, learnable: bool = False, max_logit_scale: float = 100.0
    ) -> None:
        super().__init__()
        if not (max_logit_scale > 0 and math.isfinite(max_logit_scale)):
            raise ArgumentError("max_logit_scale", f"max_logit_scale must be a finite number > 0, got {max_logit_scale}")
        self.max_logit_scale = max_logit_scale
        self._check_temperature(temperature)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("logit_scale", log_scale)

    def _check_temperature(self, temperature: float) -> None:
        check_temperature(temperature, "temperature")
        if 1.0 / temperature > self.max_logit_scale:  # scale() would silently clamp it to the cap
            raise ArgumentError(
                "temperature",
                f"temperature {temperature:g} is below 1/max_logit_scale = {1.0 / self.max_logit_scale:g}, where the "
                "logit scale is clamped; raise the temperature or max_logit_scale",
            )

    def set_argument(self, name: str, value: float) -> None:
        """A scheduled fixed temperature: writes the buffer log(1/tau) (a learnable one is refused)."""
        if isinstance(self.logit_scale, nn.Parameter):
            raise ArgumentError(name, "a learnable temperature cannot be scheduled (learnable: true); "
                                      "schedule a fixed one (learnable: false) or give a number")
        self._check_temperature(value)
        self.logit_scale.fill_(math.log(1.0 / value))

    def scale(self) -> Tensor:
        """The current 1/tau. A learnable scale is clamped in place at `max_logit_scale` (as
        CLIP does after each step), so it keeps a gradient and can come back down."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))
        return self.logit_scale.exp()

    def forward(self, a: Tensor, b: Tensor, *, ctx: EdgeContext) -> Tensor:
        a, b = as_float(self.project(a)), as_float(b)
        rows, cols = similarity_blocks(self.scale() * a, b, ctx)  # scaled rows: S^T stays a view
        targets = soft_targets(ctx.local(ctx.image_ids), ctx.image_ids)  # symmetric: rows' and columns'
        ce = cross_entropy_soft_rows(rows, targets).sum() + cross_entropy_soft_rows(cols, targets).sum()
        return 0.5 * ce / ctx.size


@LOSSES.register("triplet")
class Triplet(EdgeLoss):
    """Hinge triplet loss with the hardest in-batch negative (VSE++, Faghri et al. 2018).

    For each pair i: L_i = [m - s_ii + max_{j not pos(i)} s_ij]_+ + [m - s_ii + max_{j not pos(i)} s_ji]_+
    with s = S(a, b); the mean over i. With `hardest: false` the max becomes a sum over all
    negatives (the VSE0 form). VLDeformer's optional term (margin 1.0 in its public code).

    Local mode (`EdgeContext.rows` = R): the terms of the pairs i in R, over the global N;
    the row hinge from a[R]'s row of s, the column hinge from b[R]'s row of s^T, each max or
    sum over all N rows of the gathered batch.
    """

    inputs = ("a", "b")
    same_dim = (("a", "b"),)
    global_batch = True
    local_loss = True

    def __init__(self, *, margin: float = 0.2, hardest: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.hardest = hardest

    def forward(self, a: Tensor, b: Tensor, *, ctx: EdgeContext) -> Tensor:
        rows, cols = similarity_blocks(as_float(a), as_float(b), ctx)  # cols[j, i] = s_ij
        pos = rows.diagonal(ctx.offset)[:, None]  # s_ii of the computed pairs
        neg = ~local_positives(ctx)
        cost_ab = (self.margin - pos + rows).clamp_min(0) * neg
        cost_ba = (self.margin - pos + cols).clamp_min(0) * neg
        if self.hardest:
            return (cost_ab.max(1).values + cost_ba.max(1).values).sum() / ctx.size
        return (cost_ab.sum(1) + cost_ba.sum(1)).sum() / ctx.size
