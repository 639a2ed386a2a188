"""MCAD's fused-teacher losses: a single-stream teacher modifies a dual teacher's targets.

MCAD (Lei et al., Findings of NAACL 2024, arXiv 2310.19654) distils a dual-stream student
from two teachers: a dual-stream one, cheap over all B² pairs, and a single-stream (fused)
one, more accurate because image and text interact early but too slow to score every
pair. The fused pair scores modify the dual teacher's similarity distributions
(`fused_kl`) and the fused pair features modify its per-modality features
(`fused_feature`). The paper does not publish the mixing operator; both are arguments
here, and the defaults of `experiments/mcad.yaml` were chosen by measurement
(docs/results.md).

Which pairs the fused teacher scores: for each image row, its positives and the top-k
other-image captions ranked by the dual teacher; for each caption row, its positives and
the top-k other-image images (MCAD's reading in METHODS.md; ALBEF/BLIP re-rank the same
way). The union is scored once per step; a frozen teacher's `PairScorer` memoises pairs,
so `fused_kl` and `fused_feature` on one teacher share the work.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    ArgumentError,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    positive_mask,
)
from distill.losses.ensemble import TeacherEnsemble, check_each, kl_to_mixture, softmax_ensemble
from distill.models.fusion import PairScorer
from distill.registry import LOSSES

MIXES = ("prob", "logit", "feature")
_SLOTS = ("student_image", "student_text", "teacher_image", "teacher_text", "pair")


def candidate_mask(sim: Tensor, image_ids: Tensor, k: int) -> Tensor:
    """(B, T) bool: each row's positives (same image id) plus its k highest-`sim` other-image
    columns (fewer when the row has fewer other-image columns)."""
    pos = positive_mask(image_ids)
    others = sim.masked_fill(pos, float("-inf"))
    k = min(k, sim.shape[1])
    mask = pos.clone()
    if k > 0:
        top = others.topk(k, dim=1)
        mask.scatter_(1, top.indices, torch.isfinite(top.values))
    return mask


def fused_scores(pair: PairScorer, candidates: Tensor) -> Tensor:
    """(B, T) fused ITM logits on the candidate pairs, -inf elsewhere (one scorer call)."""
    rows, cols = candidates.nonzero(as_tuple=True)
    out = torch.full(candidates.shape, float("-inf"), device=candidates.device)
    out[rows, cols] = pair.scores(rows, cols).to(out.device)
    return out


def mixed_targets(dual_logits: Tensor, fused: Tensor, candidates: Tensor, *, mix: str, alpha: float,
                  fused_temperature: float) -> Tensor:
    """Row-wise target distributions (B, T) of the modified teacher.

    prob:  P = (1 - alpha) softmax(dual_logits) + alpha softmax_C(fused / tau_f), the fused
           distribution being over the row's candidates C only;
    logit: P = softmax(dual_logits + alpha (fused - min_C fused) on C, + 0 off C): the fused
           evidence raises candidates over the pairs it did not score.
    """
    if alpha == 0:
        return dual_logits.softmax(-1)
    if mix == "prob":
        fused_p = (fused / fused_temperature).softmax(-1)  # -inf off C -> 0
        return (1.0 - alpha) * dual_logits.softmax(-1) + alpha * fused_p
    floor = fused.masked_fill(~candidates, float("inf")).amin(1, keepdim=True)
    bonus = torch.where(candidates, fused - floor, torch.zeros_like(fused))
    return (dual_logits + alpha * bonus).softmax(-1)


@LOSSES.register("fused_kl")
class FusedKL(TeacherEnsemble):
    """KL from the fused-modified teacher similarity distribution to the student's (MCAD).

    With student embeddings (v, w), dual teacher embeddings (v', w'), S = v w^T / tau_s,
    S' = v' w'^T / tau_t, and F the fused teacher's ITM logits on the candidate pairs C
    (positives + the dual teacher's top-k per row, see `candidate_mask`):

        L_rows = mean_i KL(P_i || softmax(S_i)),   P = mixed_targets(S', F, C)

    and with `columns: true` the same for caption rows (S^T, S'^T, candidates taken per
    column), averaged with the rows.

    `mix: feature` is the feature-level reading of MCAD's abstract ("fused features are
    incorporated into the dual teacher's image and text features, from which the modified
    similarity distributions are formed"): each row's teacher features become
    u^v_i = [sqrt(1 - alpha) t^v_i ; sqrt(alpha) f_i] and u^w_i likewise, with f_i the unit
    fused feature of the aligned pair (image i, caption i), so that

        S~_ij = u^v_i . u^w_j = (1 - alpha) t^v_i . t^w_j + alpha f_i . f_j,   P = softmax(S~ / tau_t)

    over all B x B pairs from B fused passes (no candidates, k is unused). `alpha = 0` is ConaCLIP's similarity KL
    (`similarity_kl`); `alpha = 1` with `mix: prob` distils the fused teacher alone over
    the candidates. Computed on each rank's local rows (the scorer holds local inputs).

    Several dual teachers (the student pair, then one pair per dual teacher, then the pair
    scorer: `[student_image, student_text, teacher1_image, teacher1_text, ..., pair]`): the
    dual side is their ensemble, S' = log sum_k w_k softmax(v'^k w'^k^T / tau_k) row-wise
    (`softmax_ensemble`: logits whose softmax averages the teachers' probabilities; the
    columns from the teachers' column distributions), which then ranks the candidates and
    mixes with the fused scores as one teacher's S' does. `mix: feature` mixes the fused
    features into each dual teacher (S~^k = (1 - alpha) S'^k + alpha f f^T, over tau_k) and
    averages the teachers' softmaxes of S~^k.

    Args:
        k: Dual-teacher candidates per row scored by the fused teacher (besides positives).
        mix: "prob" or "logit" (see `mixed_targets`).
        alpha: Weight of the fused teacher in the mix.
        student_temperature, teacher_temperature: tau_s and tau_t (tau_k: a number for every
            dual teacher, or one per teacher).
        teacher_weights: w_k >= 0 of the dual teachers, normalised; default equal.
        fused_temperature: tau_f on the ITM logits (mix: prob).
        columns: Also distil the caption-to-image direction.
    """

    inputs = _SLOTS
    same_dim = (("student_image", "student_text"), ("teacher_image", "teacher_text"))
    global_batch = False
    schedulable = {"student_temperature": "tau_s", "teacher_temperature": "tau_t", "fused_temperature": "tau_f"}
    per_teacher = {"teacher_temperature": "tau_t"}
    teacher_sides = ("image", "text")
    trailing = ("pair",)

    def __init__(
        self, *, k: int = 8, mix: str = "prob", alpha: float = 0.5, student_temperature: float = 0.05,
        teacher_temperature: float | list[float] = 0.05, fused_temperature: float = 1.0, columns: bool = True,
        teacher_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if mix not in MIXES:
            raise ArgumentError("mix", f"mix must be one of {MIXES}, got {mix!r}")
        if not 0.0 <= alpha <= 1.0 and mix in ("prob", "feature"):
            raise ArgumentError("alpha", f"alpha must be in [0, 1] with mix: {mix}, got {alpha}")
        if alpha < 0 or k < 0:
            raise ValueError(f"alpha and k must be >= 0, got alpha={alpha}, k={k}")
        for name, value in (("student_temperature", student_temperature), ("fused_temperature", fused_temperature)):
            check_temperature(value, name)
        self.k, self.mix, self.alpha, self.columns = k, mix, alpha, columns
        self.tau_s, self.tau_f = student_temperature, fused_temperature
        self.tau_t = check_each(teacher_temperature, "teacher_temperature", check_temperature)
        self.init_teachers(teacher_weights)

    def setup(self, dims: Mapping[str, int]) -> None:
        """Nothing to project: student and teacher widths are compared within themselves."""

    def forward(self, student_image: Tensor, student_text: Tensor, *rest: Tensor | PairScorer,
                ctx: EdgeContext) -> Tensor:
        *teachers, pair = rest  # the dual teachers' pairs, then the fused teacher's scorer
        duals = self.teacher_pairs(teachers)  # type: ignore[arg-type]
        ids = ctx.image_ids
        s = as_float(student_image) @ as_float(student_text).t() / self.tau_s
        if self.mix == "feature":
            return self.feature_level(s, duals, pair)  # type: ignore[arg-type]
        with torch.no_grad():
            ts = [as_float(ti) @ as_float(tt).t() / tau for (ti, tt), tau in zip(duals, self.each(self.tau_t))]
            t = softmax_ensemble(ts, self.weights)  # one dual teacher: its logits
            t_cols = softmax_ensemble([x.t() for x in ts], self.weights)  # one: t.t()
            rows = candidate_mask(t, ids, self.k)
            cols = candidate_mask(t_cols, ids, self.k).t() if self.columns else torch.zeros_like(rows)
            # alpha = 0 reads nothing from the fused teacher: skip its forward passes
            fused = fused_scores(pair, rows | cols) if self.alpha > 0 else torch.zeros_like(t)
            kw = dict(mix=self.mix, alpha=self.alpha, fused_temperature=self.tau_f)
            target = mixed_targets(t, fused.masked_fill(~rows, float("-inf")), rows, **kw)
        loss = kl_to_mixture(target, s)
        if self.columns:
            with torch.no_grad():
                target_c = mixed_targets(t_cols, fused.t().masked_fill(~cols.t(), float("-inf")), cols.t(), **kw)
            loss = 0.5 * (loss + kl_to_mixture(target_c, s.t()))
        return loss

    def feature_level(self, s: Tensor, duals: list[tuple[Tensor, Tensor]], pair: PairScorer) -> Tensor:
        """`mix: feature`: KL to the softmax of the feature-mixed dual teachers' similarities
        (averaged over the teachers, see above)."""
        with torch.no_grad():
            f = None
            if self.alpha > 0:  # alpha = 0 reads nothing from the fused teacher: skip its passes
                rows = torch.arange(len(duals[0][0]), device=duals[0][0].device)
                f = F.normalize(as_float(pair.features(rows, rows).to(duals[0][0].device)), dim=-1)
            ts = []
            for (teacher_image, teacher_text), tau in zip(duals, self.each(self.tau_t)):
                t = as_float(teacher_image) @ as_float(teacher_text).t()
                if f is not None:
                    t = (1.0 - self.alpha) * t + self.alpha * (f @ f.t())
                ts.append(t / tau)
            t = softmax_ensemble(ts, self.weights)
            t_cols = softmax_ensemble([x.t() for x in ts], self.weights)
        loss = kl_to_mixture(t.softmax(-1), s)
        return 0.5 * (loss + kl_to_mixture(t_cols.softmax(-1), s.t())) if self.columns else loss


@LOSSES.register("fused_feature")
class FusedFeature(EdgeLoss):
    """Feature distillation towards dual teacher features modified by fused pair features (MCAD).

    For the aligned pair of row i (image row i, caption row i), with f_i the fused teacher's
    pair feature and t^v_i, t^w_i the dual teacher's image and text embeddings, the modified
    teacher features are the unit vectors

        u^v_i = [sqrt(1 - beta) t^v_i ; sqrt(beta) f_i / |f_i|],   u^w_i likewise with t^w_i,

    (a weighted concatenation: beta is the fused share of the squared norm), and

        L = 1/2 mean_i (||P_v a^v_i - u^v_i||^2 + ||P_w a^w_i - u^w_i||^2),

    with a^v, a^w the student embeddings and P_v, P_w learned linear maps to the target width
    followed by re-normalisation (the student side carries the projection, as in FitNets
    and CLIP-KD, so the frozen targets cannot move). `beta = 0` is plain feature distance
    to the dual teacher. Computed on each rank's local rows.

    Args:
        beta: The fused feature's share in [0, 1].
    """

    inputs = _SLOTS
    same_dim = (("student_image", "student_text"), ("teacher_image", "teacher_text"))
    global_batch = False

    def __init__(self, *, beta: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ArgumentError("beta", f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.proj_image: nn.Module | None = None
        self.proj_text: nn.Module | None = None

    def setup(self, dims: Mapping[str, int]) -> None:
        """Student-side projections to the target width (teacher width + fused width)."""
        width = dims["teacher_image"] + dims["pair"]
        self.proj_image = nn.Linear(dims["student_image"], width, bias=False)
        self.proj_text = nn.Linear(dims["student_text"], width, bias=False)

    def targets(self, teacher: Tensor, fused: Tensor) -> Tensor:
        """The modified teacher features u (B, D_t + D_f), unit length."""
        t = F.normalize(as_float(teacher), dim=-1)
        f = F.normalize(as_float(fused), dim=-1)
        return torch.cat([(1.0 - self.beta) ** 0.5 * t, self.beta ** 0.5 * f], dim=-1)

    def forward(self, student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
                pair: PairScorer, *, ctx: EdgeContext) -> Tensor:
        assert self.proj_image is not None and self.proj_text is not None, "setup() was not called"
        with torch.no_grad():
            rows = torch.arange(len(student_image), device=student_image.device)
            if self.beta > 0:
                fused = pair.features(rows, rows).to(student_image.device)
            else:  # the fused part of the target is zero: skip the fused teacher's forward passes
                fused = torch.ones(len(rows), self.proj_image.out_features - teacher_image.shape[1],
                                   device=student_image.device)
            u_image, u_text = self.targets(teacher_image, fused), self.targets(teacher_text, fused)
        p_image = F.normalize(self.proj_image(as_float(student_image)), dim=-1)
        p_text = F.normalize(self.proj_text(as_float(student_text)), dim=-1)
        return 0.5 * ((p_image - u_image).pow(2).sum(-1).mean() + (p_text - u_text).pow(2).sum(-1).mean())


__all__ = ["FusedFeature", "FusedKL", "candidate_mask", "fused_scores", "mixed_targets"]
