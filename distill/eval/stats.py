"""Is a difference between two models real? Paired statistics over retrieval queries.

Every evaluation keeps the rank of each query's first positive (`retrieval_ranks`), so two
models evaluated on the same split are compared query by query, without re-encoding:

- **paired bootstrap**: resample the queries (images for image->text, captions for
  text->image, each direction on its own) with replacement, the *same* resample for both
  models, and recompute the metric difference; the 2.5th and 97.5th percentiles of B draws
  are the 95% interval. With several seeds the per-query differences are averaged over the
  seeds first (the queries are the same), so seed noise and query noise are both in the
  interval, pooled as the issue's ablation tables need.
- **sign test**: over the queries whose score differs between the models (a query's score
  is its contribution to the metric: the number of K with rank < K, for RSUM), the count
  of wins against losses under a fair coin; two-sided exact binomial p-value.

The metrics are linear in the queries, so a bootstrap draw is one weighted sum per
direction: B = 1000 draws over 2,500 captions take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DIRECTIONS = ("i2t", "t2i")
KS = (1, 5, 10)
METRICS = (*(f"{d}_r{k}" for d in DIRECTIONS for k in KS), "rsum")

Ranks = Mapping[str, Any]
"""{"i2t": (N,) ranks of the images' first positive, "t2i": (T,) of the captions'}."""


@dataclass
class Difference:
    """A - B on one metric: the point value over all queries, its 95% bootstrap interval,
    and the sign test's p-value over the queries."""

    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    p_sign: float
    wins: int
    losses: int

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resolved": self.resolved}


def query_scores(ranks: Ranks, metric: str) -> dict[str, np.ndarray]:
    """Each query's contribution to `metric` (percent points), per direction; the metric is
    the sum over both directions of these scores."""
    out = {}
    for d in DIRECTIONS:
        rank = np.asarray(ranks[d])
        if metric == "rsum":
            hits = sum((rank < k).astype(np.float64) for k in KS)
        elif metric.startswith(f"{d}_r"):
            hits = (rank < int(metric.split("_r", 1)[1])).astype(np.float64)
        else:
            hits = np.zeros(len(rank))
        out[d] = 100.0 * hits / len(rank)
    return out


def metric_value(ranks: Ranks, metric: str) -> float:
    """The metric itself (R@K in percent, or RSUM) from per-query ranks."""
    return float(sum(s.sum() for s in query_scores(ranks, metric).values()))


def _check_paired(a: Sequence[Ranks], b: Sequence[Ranks]) -> None:
    if not a or len(a) != len(b):
        raise ValueError(f"paired comparison needs the same number of runs on both sides, got {len(a)} and {len(b)}")
    for d in DIRECTIONS:
        sizes = {len(r[d]) for r in (*a, *b)}
        if len(sizes) != 1:
            raise ValueError(f"{d}: the runs were evaluated on different query sets (sizes {sorted(sizes)})")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def compare_runs(
    a: Sequence[Ranks], b: Sequence[Ranks], metrics: Sequence[str] = METRICS, *, draws: int = 1000, seed: int = 0
) -> list[Difference]:
    """A - B on each metric, paired over queries and over runs (seeds, in the same order).

    Args:
        a: Per-query ranks of model A, one entry per seed.
        b: The same for model B, paired with `a` by position.
        metrics: Which metrics.
        draws: Bootstrap resamples.
        seed: Seed of the resampling (the same draws for every metric).

    Raises:
        ValueError: Unpaired inputs (a different number of runs or of queries).
    """
    _check_paired(a, b)
    rng = np.random.default_rng(seed)
    sizes = {d: len(a[0][d]) for d in DIRECTIONS}
    weights = {d: rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64) for d, n in sizes.items()}
    out = []
    for metric in metrics:
        diff = {d: np.zeros(n) for d, n in sizes.items()}
        for ra, rb in zip(a, b):
            sa, sb = query_scores(ra, metric), query_scores(rb, metric)
            for d in DIRECTIONS:
                diff[d] += (sa[d] - sb[d]) / len(a)
        boot = sum(weights[d] @ diff[d] for d in DIRECTIONS)
        pooled = np.concatenate([diff[d] for d in DIRECTIONS])
        wins, losses = int((pooled > 1e-12).sum()), int((pooled < -1e-12).sum())
        out.append(Difference(
            metric=metric,
            a=float(np.mean([metric_value(r, metric) for r in a])),
            b=float(np.mean([metric_value(r, metric) for r in b])),
            delta=float(pooled.sum()),
            low=float(np.percentile(boot, 2.5)),
            high=float(np.percentile(boot, 97.5)),
            p_sign=sign_test(wins, losses), wins=wins, losses=losses,
        ))  # fmt: skip
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
