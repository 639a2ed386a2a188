"""Contrastive loss with corpus-level hard negatives mined from a pre-computed index."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from distill.losses.base import (
    ArgumentError,
    EdgeContext,
    EdgeLoss,
    as_float,
    check_temperature,
    cross_entropy_soft,
    soft_targets,
)
from distill.registry import LOSSES

DIRECTIONS = ("i2t", "t2i")


@LOSSES.register("hard_negative")
class HardNegative(EdgeLoss):
    """InfoNCE whose candidates are the in-batch positives plus each row's mined negatives.

    For row i with query q_i (e.g. the student image) and in-batch candidates p_j (e.g. the
    student captions), and n_i1..n_ik the index embeddings of the k hardest negatives mined
    for the sample of row i (Ren and Zhu's L_HN, "Leaner and Faster", NAACL 2022,
    arXiv 2204.13913):

        l_i = [q_i p_1 / tau, ..., q_i p_B / tau, q_i n_i1 / tau, ..., q_i n_ik / tau]
        L   = mean_i -sum_j y_ij log softmax(l_i)_j,

    with y_i uniform over the in-batch rows j sharing row i's image id and 0 on the mined
    negatives (the index never mines a sample of the same image). `direction: i2t` takes
    image queries and caption negatives (the index's `i2t` table and `text` embeddings);
    `t2i` caption queries and image negatives. The negatives come from the index, i.e. from
    the encoder that built it, without gradient: the index should be built by the side
    that is fixed while this loss trains (Leaner-and-Faster's stage 2). Computed on each
    rank's local rows (sample keys are not gathered).

    The loss never opens a file: `fit` reads the negatives file named by `index` and hands
    it over with `set_negatives` (`distill.negatives.refresh.attach_negatives`), so a
    missing file fails before training. `refresh_every` is read by
    `distill.negatives.refresh.NegativesRefresh`, which re-embeds the corpus with the
    current weights of the file's model and re-mines every `refresh_every` steps.

    Args:
        index: Path of a negatives file written by `distill index mine` (or a stage's `build_index`).
        k: Mined negatives per row (at most the index's k).
        temperature: tau.
        direction: "i2t" or "t2i".
        refresh_every: Rebuild the index every this many training steps; None never.
    """

    inputs = ("query", "positive")
    same_dim = (("query", "positive"),)
    global_batch = False
    schedulable = {"temperature": "tau"}

    def __init__(
        self,
        *,
        index: str,
        k: int = 8,
        temperature: float = 0.05,
        direction: str = "i2t",
        refresh_every: int | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature, "temperature")
        if direction not in DIRECTIONS:
            raise ArgumentError("direction", f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if k < 1:
            raise ArgumentError("k", f"k must be >= 1, got {k}")
        if refresh_every is not None and refresh_every < 1:
            raise ArgumentError("refresh_every", f"refresh_every must be >= 1 or null, got {refresh_every}")
        self.index_path, self.k, self.tau = index, k, temperature
        self.direction, self.refresh_every = direction, refresh_every
        self.rows: dict[str, int] = {}
        self.table: Tensor | None = None  # (N, k) candidate rows per sample; not in the state dict
        self.bank: Tensor | None = None  # (M, D) candidate embeddings

    def set_negatives(self, index: Mapping[str, Any]) -> None:
        """Use mined negatives (the dict `distill.negatives.store.load_negatives` returns).

        Raises:
            ValueError: If the index mines fewer than `k` negatives per sample.
        """
        table = index[self.direction]
        if table.shape[1] < self.k:
            raise ValueError(f"k={self.k} but the index {self.index_path!r} holds {table.shape[1]} negatives per sample")
        self.rows = {key: i for i, key in enumerate(index["keys"])}
        self.table = table[:, : self.k].long()
        self.bank = index["text" if self.direction == "i2t" else "image"].float()

    def negatives(self, keys: list[str], device: torch.device) -> Tensor:
        """(B, k, D) index embeddings of the mined negatives of the samples `keys`."""
        if self.table is None or self.bank is None:
            raise RuntimeError(
                f"no negatives attached for {self.index_path!r}: `fit` attaches them "
                "(distill.negatives.refresh.attach_negatives); call set_negatives first"
            )
        missing = [key for key in keys if key not in self.rows]
        if missing:
            raise KeyError(f"sample {missing[0]!r} is not in the index {self.index_path!r}; was it built from this dataset?")
        if self.bank.device != device:
            self.bank, self.table = self.bank.to(device), self.table.to(device)
        rows = torch.tensor([self.rows[key] for key in keys], device=device)
        return self.bank[self.table[rows]]

    def forward(self, query: Tensor, positive: Tensor, *, ctx: EdgeContext) -> Tensor:
        q, p = as_float(query), as_float(positive)
        neg = self.negatives(ctx.keys, q.device)
        if neg.shape[-1] != q.shape[-1]:
            raise ValueError(f"index {self.index_path!r} has {neg.shape[-1]}-d embeddings, the query {q.shape[-1]}-d")
        logits = torch.cat([q @ p.t(), torch.einsum("bd,bkd->bk", q, neg)], 1) / self.tau
        targets = torch.cat([soft_targets(ctx.image_ids), q.new_zeros(len(q), neg.shape[1])], 1)
        return cross_entropy_soft(logits, targets)
