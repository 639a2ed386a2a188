"""Feature distillation: the distance between student and teacher embeddings of a sample."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import ArgumentError, EdgeContext, EdgeLoss, as_float
from distill.registry import LOSSES

DISTANCES = ("mse", "l1", "cosine")


@LOSSES.register("feature")
class FeatureDistance(EdgeLoss):
    """Per-sample feature distance between a student node and a teacher node.

    mse:    L = mean_i ||P a_i - b_i||_2^2   (ConaCLIP's FD; CLIP-KD's feature distillation)
    l1:     L = mean_i ||P a_i - b_i||_1
    cosine: L = mean_i (1 - cos(P a_i, b_i))

    P is a learned linear projection (then re-normalisation) when the widths differ, the
    identity otherwise (CLIP-KD, Yang et al. CVPR 2024). No cross-sample term, so the loss is
    computed on each rank's local rows.
    """

    inputs = ("student", "teacher")
    same_dim = (("student", "teacher"),)
    projectable = True
    global_batch = False

    def __init__(self, *, distance: str = "mse") -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ArgumentError("distance", f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance

    def forward(self, student: Tensor, teacher: Tensor, *, ctx: EdgeContext) -> Tensor:
        a, b = as_float(self.project(student)), as_float(teacher)
        if self.distance == "mse":
            return (a - b).pow(2).sum(-1).mean()
        if self.distance == "l1":
            return (a - b).abs().sum(-1).mean()
        return (1.0 - F.cosine_similarity(a, b, dim=-1)).mean()
