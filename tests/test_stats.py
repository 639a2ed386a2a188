"""Per-query ranks reproduce the recalls; the paired bootstrap and sign test against
hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.eval.retrieval import recalls_from_ranks, retrieval_metrics, retrieval_ranks
from distill.eval.stats import compare_runs, metric_value, query_scores, sign_test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_reproduce_the_recalls_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(40, 6, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(200, 6, generator=gen), dim=-1)
    ids = torch.arange(100, 140)
    text_ids = ids.repeat_interleave(5)[torch.randperm(200, generator=gen)]
    ranks = retrieval_ranks(img, ids, txt, text_ids, chunk_size=7)
    assert recalls_from_ranks(ranks) == retrieval_metrics(img, ids, txt, text_ids, chunk_size=7)
    # the exact rank, written out: negatives scoring above the best positive
    s = img @ txt.T
    for i in range(40):
        best = s[i][text_ids == ids[i]].max()
        assert ranks["i2t"][i] == int((s[i][text_ids != ids[i]] > best).sum())
    for j in range(200):
        col, own = s[:, j], ids == text_ids[j]
        assert ranks["t2i"][j] == int((col[~own] > col[own].max()).sum())


def test_query_scores_sum_to_the_metric() -> None:
    ranks = {"i2t": np.array([0, 3, 12, 7]), "t2i": np.array([0, 0, 4, 9, 20, 1, 5, 6])}
    assert metric_value(ranks, "i2t_r5") == pytest.approx(100 * 2 / 4)
    assert metric_value(ranks, "t2i_r1") == pytest.approx(100 * 2 / 8)
    assert metric_value(ranks, "rsum") == pytest.approx(sum(recalls_from_ranks(ranks).values()) / 2)
    assert query_scores(ranks, "i2t_r1")["t2i"].sum() == 0


def test_sign_test_matches_the_binomial_formula() -> None:
    for wins, losses in ((0, 0), (3, 1), (10, 2), (25, 25), (40, 60)):
        n, k = wins + losses, min(wins, losses)
        expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_interval_of_a_hand_computed_case() -> None:
    """Two models over 4 image and 4 caption queries: B wins exactly one caption at R@1.

    The R@1 (t2i) difference is 100/4 * (number of times the winning caption is drawn)/...
    per draw: with weights w (a multinomial over 4 captions), delta* = 25 * w_winner, so the
    interval follows the Binomial(4, 1/4) quantiles of w_winner: 2.5% -> 0, 97.5% -> 3.
    """
    same = np.array([0, 0, 1, 2])
    a = {"i2t": same, "t2i": np.array([0, 0, 0, 5])}
    b = {"i2t": same, "t2i": np.array([0, 0, 0, 0])}
    (d,) = compare_runs([b], [a], ["t2i_r1"], draws=20000, seed=3)
    assert d.delta == pytest.approx(25.0) and d.b == pytest.approx(75.0) and d.a == pytest.approx(100.0)
    assert d.low == pytest.approx(0.0) and d.high == pytest.approx(75.0)
    assert (d.wins, d.losses) == (1, 0) and d.p_sign == pytest.approx(1.0)
    assert not d.resolved  # one caption out of four cannot resolve anything


def test_identical_runs_give_a_zero_interval_and_seeds_pool() -> None:
    gen = np.random.default_rng(0)
    runs = [{"i2t": gen.integers(0, 20, 50), "t2i": gen.integers(0, 20, 250)} for _ in range(3)]
    (d,) = compare_runs(runs, runs, ["rsum"], draws=200)
    assert d.delta == d.low == d.high == 0.0 and d.p_sign == 1.0
    better = [{"i2t": np.maximum(r["i2t"] - 5, 0), "t2i": np.maximum(r["t2i"] - 5, 0)} for r in runs]
    (d,) = compare_runs(better, runs, ["rsum"], draws=500)
    assert d.resolved and d.low > 0 and d.p_sign < 1e-6
    expected = np.mean([metric_value(x, "rsum") - metric_value(y, "rsum") for x, y in zip(better, runs)])
    assert d.delta == pytest.approx(expected)
    with pytest.raises(ValueError, match="same number of runs"):
        compare_runs(better, runs[:2])


def test_compare_two_checkpoints_end_to_end(tiny_checkpoint, tmp_path, capsys) -> None:
    from distill.commands.cli import main

    # the same checkpoint against itself: every difference is exactly 0, and the ranks are kept
    assert main(["compare", str(tiny_checkpoint), str(tiny_checkpoint), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "rsum" in out and "+0.00  [+0.00, +0.00] unresolved" in out
    assert (tiny_checkpoint.parent / "eval_test.ranks.npz").is_file()
    assert main(["compare", str(tiny_checkpoint), str(tmp_path), "--draws", "200"]) == 2
    assert "no per-query ranks" in capsys.readouterr().err
