"""Token-level losses: between layer nodes (hidden states, patch tokens, attention, values).

Each reads `Tokens` (states and the mask of real positions; `distill.models.intermediate`)
and is per sample: L = (1/N) sum_n l_n, with l_n averaged over sample n's real positions only
(text padding never counts, and a short caption weighs as much as a long one). No term spans
two samples, so under DDP each rank computes its own rows (`global_batch = False`) and the
graph's local scaling makes the gradient that of the global batch.

An edge with a layer map (`layers:` in the YAML) hands each slot one node per layer pair; the
loss is the mean over the K pairs, L = (1/K) sum_k L(student_k, teacher_k), so its weight does
not grow with the number of pairs. Position-by-position losses (`aligned`) need both nodes
to see the same positions: one tokenizer and `max_length` for text, one grid for images
(checked by `distill validate` where the sequences are known, and on every batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import ArgumentError, EdgeContext, EdgeLoss
from distill.models.intermediate import Tokens
from distill.registry import LOSSES

STATES = ("hidden", "tokens")
DISTANCES = ("mse", "l1", "cosine")
POOLS = ("mean", "first")
HEAD_MAPS = ("group", "mean")


def per_sample(values: Tensor, mask: Tensor) -> Tensor:
    """(N,) mean of per-position values (N, L) over each sample's real positions."""
    m = mask.to(values.dtype)
    return (values * m).sum(1) / m.sum(1).clamp_min(1.0)


def kl_rows(target: Tensor, log_student: Tensor, keys: Tensor) -> Tensor:
    """KL(target || student) of each row over its last dimension, keys where `keys` is True
    (broadcast over the row dimensions): sum_j p_j (log p_j - log q_j)."""
    terms = torch.xlogy(target, target) - target * log_student
    return (terms * keys.to(terms.dtype)).sum(-1)


def widths(dim: int | tuple[int, ...]) -> list[int]:
    """A slot's width per layer pair (an int for one pair)."""
    return [dim] if isinstance(dim, int) else list(dim)


class TokenLoss(EdgeLoss):
    """Base of the token-level losses: slots `student` and `teacher`, one pair or a layer map.

    Subclasses set `reads` (the layer kinds each slot takes), `aligned` and `pair_loss`.
    """

    inputs = ("student", "teacher")
    same_dim = ()
    global_batch = False
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {"student": STATES, "teacher": STATES}
    aligned: ClassVar[bool] = True
    """Compares position by position: both nodes must see the same positions."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleList()

    def setup(self, dims: Mapping[str, Any]) -> None:
        """One learned linear map per layer pair whose widths differ (identity otherwise)."""
        self.maps = nn.ModuleList([nn.Linear(a, b) if a != b else nn.Identity()
                                   for a, b in zip(widths(dims["student"]), widths(dims["teacher"]))])

    def mapped(self, k: int, x: Tensor) -> Tensor:
        """Student states of pair k in the teacher's width."""
        if k >= len(self.maps) or isinstance(self.maps[k], nn.Identity):
            return x.float()
        m = self.maps[k]
        return m(x.to(m.weight.dtype)).float()

    def layer_problem(self, layers: Mapping[str, Any]) -> str | None:
        """Why these nodes (`distill.models.intermediate.LayerRead` per slot) cannot be
        compared, or None."""
        s, t = layers["student"], layers["teacher"]
        if not self.aligned:
            return None
        if s.output != t.output:
            return f"it compares position by position, and {s.name} is {s.output} while {t.name} is {t.output}"
        if s.dynamic and s.sequence and t.sequence and s.sequence != t.sequence:
            return (f"it compares position by position, and {s.name} and {t.name} tokenise differently "
                    f"({s.sequence} vs {t.sequence}: vocabulary | max_length); use one tokenizer, or token_feature")
        if not s.dynamic and s.shape.positions != t.shape.positions:
            return (f"it compares position by position, and {s.name} has {s.shape.positions} positions, "
                    f"{t.name} {t.shape.positions}; pick layers of one grid, or token_feature (pooled)")
        return None

    def check_pair(self, s: Tokens, t: Tokens) -> None:
        """Refuse misaligned positions at run time (what validation could not know)."""
        if self.aligned and (s.mask.shape != t.mask.shape or not torch.equal(s.mask, t.mask)):
            raise ValueError(f"{type(self).__name__}: student and teacher positions differ (masks "
                             f"{tuple(s.mask.shape)} vs {tuple(t.mask.shape)}): the two models must tokenise alike")

    def pair_loss(self, k: int, s: Tokens, t: Tokens) -> Tensor:
        """(N,) per-sample terms of layer pair k."""
        raise NotImplementedError

    def forward(self, student: Tokens | list[Tokens], teacher: Tokens | list[Tokens], *, ctx: EdgeContext) -> Tensor:
        ss = student if isinstance(student, list) else [student]
        ts = teacher if isinstance(teacher, list) else [teacher]
        terms = []
        for k, (s, t) in enumerate(zip(ss, ts)):
            self.check_pair(s, t)
            terms.append(self.pair_loss(k, s, t).mean())
        return torch.stack(terms).mean()


@LOSSES.register("hidden_mse")
class HiddenMSE(TokenLoss):
    """Hidden-state (or patch-token) regression, TinyBERT's L_hidn (Jiao et al., Findings of
    EMNLP 2020) and FitNets' hints (Romero et al., ICLR 2015):

        l_n = 1/|M_n| sum_{l in M_n} 1/D_t ||W h^s_{n,l} + c - h^t_{n,l}||^2

    over sample n's real positions M_n; W, c a learned linear map when the widths differ (one
    per layer pair), the identity otherwise. The teacher side carries no gradient.
    """

    def pair_loss(self, k: int, s: Tokens, t: Tokens) -> Tensor:
        diff = self.mapped(k, s.states) - t.states.float().detach()
        return per_sample(diff.pow(2).mean(-1), s.mask)


def map_heads(a_s: Tensor, a_t: Tensor, how: str) -> tuple[Tensor, Tensor]:
    """Student and teacher (N, H, L, L) attention with one head count: equal counts pair
    head by head; `group` averages the larger count's heads in contiguous groups of H_big /
    H_small (a mean of distributions is a distribution); `mean` averages each side over all
    its heads."""
    hs, ht = a_s.shape[1], a_t.shape[1]
    if how == "mean":
        return a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    if hs == ht:
        return a_s, a_t
    if ht > hs:
        return a_s, a_t.unflatten(1, (hs, ht // hs)).mean(2)
    return a_s.unflatten(1, (ht, hs // ht)).mean(2), a_t


@LOSSES.register("attention_kl")
class AttentionKL(TokenLoss):
    """Self-attention distribution transfer (MiniLM, Wang et al., NeurIPS 2020; TinyBERT's
    attention loss, as a KL):

        l_n = 1/(H |M_n|) sum_h sum_{l in M_n} KL(A^t_{n,h,l} || A^s_{n,h,l})

    each row A_{n,h,l} a distribution over the keys. Head counts that differ: `heads: group`
    (default) averages the larger side's heads in contiguous groups (teacher 12 -> student 4:
    heads 0-2, 3-5, ...), which needs one count to divide the other; `heads: mean` compares
    the head-averaged maps.
    """

    reads = {"student": ("attention",), "teacher": ("attention",)}

    def __init__(self, *, heads: str = "group") -> None:
        super().__init__()
        if heads not in HEAD_MAPS:
            raise ArgumentError("heads", f"heads must be one of {HEAD_MAPS}, got {heads!r}")
        self.heads = heads

    def setup(self, dims: Mapping[str, Any]) -> None:
        """No parameters."""

    def layer_problem(self, layers: Mapping[str, Any]) -> str | None:
        hs, ht = layers["student"].shape.heads, layers["teacher"].shape.heads
        if self.heads == "group" and hs and ht and max(hs, ht) % min(hs, ht):
            return f"heads: group maps {hs} student heads and {ht} teacher heads, and neither divides the other; use heads: mean"
        return super().layer_problem(layers)

    def pair_loss(self, k: int, s: Tokens, t: Tokens) -> Tensor:
        a_s, a_t = map_heads(s.states.float(), t.states.float().detach(), self.heads)
        keys = s.mask[:, None, None, :]
        kl = kl_rows(a_t, a_s.clamp_min(torch.finfo(torch.float32).tiny).log(), keys)  # (N, H, L)
        return per_sample(kl.mean(1), s.mask)


def relations(x: Tokens, heads: int) -> Tensor:
    """(N, R, L, L) log softmax(V_r V_r^T / sqrt(d_r)) of values (N, L, D) split into R heads
    of d_r = D / R; padded keys excluded."""
    v = x.states.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, R, L, d_r)
    logits = v @ v.transpose(-2, -1) / v.shape[-1] ** 0.5
    return logits.masked_fill(~x.mask[:, None, None, :], float("-inf")).log_softmax(-1)


@LOSSES.register("value_relation")
class ValueRelation(TokenLoss):
    """MiniLM's value relation (Wang et al., NeurIPS 2020): with V split into R heads,
    VR_r = softmax(V_r V_r^T / sqrt(d_r)) per sample, and

        l_n = 1/(R |M_n|) sum_r sum_{l in M_n} KL(VR^t_{n,r,l} || VR^s_{n,r,l}).

    `heads`: R, the relation heads both sides are split into (MiniLMv2's relation heads, so
    student and teacher head counts may differ); None uses the student's attention heads.
    Each side's value width must be a multiple of R.
    """

    reads = {"student": ("values",), "teacher": ("values",)}

    def __init__(self, *, heads: int | None = None) -> None:
        super().__init__()
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise ArgumentError("heads", f"heads must be null or an integer >= 1, got {heads!r}")
        self.heads = heads

    def setup(self, dims: Mapping[str, Any]) -> None:
        """No parameters."""

    def layer_problem(self, layers: Mapping[str, Any]) -> str | None:
        s, t = layers["student"], layers["teacher"]
        r = self.heads or s.shape.heads
        for side in (s, t):
            if r and side.shape.width % r:
                return f"{side.name} has {side.shape.width} value dimensions, not a multiple of {r} relation heads"
        return super().layer_problem(layers)

    def pair_loss(self, k: int, s: Tokens, t: Tokens) -> Tensor:
        r = self.heads or s.heads or 1
        with torch.no_grad():
            target = relations(t, r).exp()
        kl = kl_rows(target, relations(s, r).clamp_min(-1e4), s.mask[:, None, None, :])
        return per_sample(kl.mean(1), s.mask)


@LOSSES.register("token_feature")
class TokenFeature(TokenLoss):
    """Token-pooled feature distance: each side's states pooled over its real positions
    (`pool: mean`, or `first`, the class token), then the distance of `feature`:

        p_n = 1/|M_n| sum_{l in M_n} h_{n,l};   l_n = d(W p^s_n + c, p^t_n)

    d: mse ||x - y||^2, l1 ||x - y||_1 or cosine 1 - cos(x, y); with `normalize` both pooled
    vectors are L2-normalised first. W, c learned when widths differ. Pooled, it compares
    nodes of different tokenizers or grids (not `aligned`).
    """

    aligned = False

    def __init__(self, *, pool: str = "mean", distance: str = "mse", normalize: bool = False) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ArgumentError("pool", f"pool must be one of {POOLS}, got {pool!r}")
        if distance not in DISTANCES:
            raise ArgumentError("distance", f"distance must be one of {DISTANCES}, got {distance!r}")
        self.pool, self.distance, self.normalize = pool, distance, normalize

    def pooled(self, x: Tokens) -> Tensor:
        if self.pool == "first":
            return x.states[:, 0].float()
        m = x.mask.to(torch.float32).unsqueeze(-1)
        return (x.states.float() * m).sum(1) / m.sum(1).clamp_min(1.0)

    def pair_loss(self, k: int, s: Tokens, t: Tokens) -> Tensor:
        a, b = self.mapped(k, self.pooled(s)), self.pooled(t).detach()
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if self.distance == "mse":
            return (a - b).pow(2).sum(-1)
        if self.distance == "l1":
            return (a - b).abs().sum(-1)
        return 1.0 - F.cosine_similarity(a, b, dim=-1)


__all__ = ["AttentionKL", "HiddenMSE", "TokenFeature", "TokenLoss", "ValueRelation", "map_heads"]
