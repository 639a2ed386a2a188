"""Image-text matching (ITM): training a fused (single-stream) model to score pairs."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import EdgeContext, EdgeLoss, as_float, check_temperature, positive_mask
from distill.models.fusion import PairScorer
from distill.registry import LOSSES


def sample_negatives(weights: Tensor, image_ids: Tensor) -> Tensor:
    """One column per row drawn with probability proportional to `weights` (B, B) among the
    rows of other images; -1 for a row whose batch holds no other image."""
    allowed = ~positive_mask(image_ids)
    w = weights.clamp_min(0) * allowed
    w = torch.where(allowed.any(1, keepdim=True) & (w.sum(1, keepdim=True) <= 0), allowed.float(), w)
    has = allowed.any(1)
    out = torch.full((len(image_ids),), -1, dtype=torch.long, device=image_ids.device)
    if has.any():
        out[has] = torch.multinomial(w[has].float(), 1).squeeze(1)
    return out


def itm_loss(scorer: PairScorer, neg_text: Tensor, neg_image: Tensor) -> Tensor:
    """Mean BCE over the B positives (i, i), the pairs (i, neg_text[i]) and (neg_image[j], j)."""
    rows = torch.arange(len(neg_text), device=neg_text.device)
    ok_t, ok_i = neg_text >= 0, neg_image >= 0
    image_idx = torch.cat([rows, rows[ok_t], neg_image[ok_i]])
    text_idx = torch.cat([rows, neg_text[ok_t], rows[ok_i]])
    labels = torch.cat([torch.ones(len(rows)), torch.zeros(int(ok_t.sum()) + int(ok_i.sum()))]).to(neg_text.device)
    logits = as_float(scorer.scores(image_idx, text_idx))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.device))


@LOSSES.register("itm")
class ITM(EdgeLoss):
    """Binary image-text matching with random in-batch negatives.

    For each image row i a caption of another image n_t(i) and for each caption row j an
    image of another image n_i(j) are drawn uniformly; with s the pair logit and sigma the
    logistic function,
    L = mean over {(i, i): 1} u {(i, n_t(i)): 0} u {(n_i(j), j): 0} of BCE(sigma(s), y),
    ALBEF's ITM (Li et al., NeurIPS 2021, arXiv 2107.07651) with its two-way softmax written
    as one log-odds logit. Rows sharing an image id are never negatives of each other.
    """

    inputs = ("pair",)
    same_dim = ()
    global_batch = False

    def setup(self, dims: Mapping[str, int]) -> None:
        """One slot: nothing to project."""

    def forward(self, pair: PairScorer, *, ctx: EdgeContext) -> Tensor:
        ids = ctx.image_ids
        uniform = torch.ones(len(ids), len(ids), device=ids.device)
        return itm_loss(pair, sample_negatives(uniform, ids), sample_negatives(uniform, ids))


@LOSSES.register("itm_hard")
class ITMHard(EdgeLoss):
    """Image-text matching with hard negatives drawn from a dual encoder's similarities.

    As `itm`, but n_t(i) ~ softmax_j(S(v, w)_ij / tau) and n_i(j) ~ softmax_i(S(v, w)_ij / tau)
    restricted to other images, with v, w the image and text nodes of a dual model
    (ALBEF and BLIP, Li et al. 2021, 2022, sample hard negatives from their contrastive
    similarities). With a frozen dual teacher these are exactly the candidates the fused
    teacher later re-scores for MCAD, so training and use see the same kind of negatives.
    """

    inputs = ("pair", "image", "text")
    same_dim = (("image", "text"),)
    global_batch = False

    def __init__(self, *, temperature: float = 0.05) -> None:
        super().__init__()
        check_temperature(temperature, "temperature")
        self.temperature = temperature

    def forward(self, pair: PairScorer, image: Tensor, text: Tensor, *, ctx: EdgeContext) -> Tensor:
        with torch.no_grad():
            sim = as_float(image) @ as_float(text).t() / self.temperature
            neg_text = sample_negatives(sim.softmax(1), ctx.image_ids)
            neg_image = sample_negatives(sim.t().softmax(1), ctx.image_ids)
        return itm_loss(pair, neg_text, neg_image)


__all__ = ["ITM", "ITMHard", "itm_loss", "sample_negatives"]
