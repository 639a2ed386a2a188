"""MCAD's `fused_kl` and `fused_feature` against formulas written out here, and the scorer memo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses.base import EdgeContext
from distill.models.fusion import PairScorer
from distill.registry import LOSSES


def table_scorer(logits: torch.Tensor, features: torch.Tensor, calls: list[int] | None = None) -> PairScorer:
    """A frozen scorer reading fixed (B, T) logits and (B, T, D) features; counts pairs run."""

    def run(i: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if calls is not None:
            calls.append(len(i))
        return logits[i, t], features[i, t]

    return PairScorer(run, n_images=logits.shape[0], n_texts=logits.shape[1], grad=False)


def embeddings(b: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_fused_kl(si, st, ti, tt, fused, ids, *, k, mix, alpha, tau_s, tau_t, tau_f, columns):  # noqa: ANN001
    """The loss written with explicit loops over rows and candidates."""

    def one_direction(s_mat, t_mat, f_mat, same):  # noqa: ANN001
        total = 0.0
        n = s_mat.shape[0]
        for i in range(n):
            others = [j for j in range(s_mat.shape[1]) if not same(i, j)]
            ranked = sorted(others, key=lambda j: -t_mat[i, j].item())[:k]
            cand = [j for j in range(s_mat.shape[1]) if same(i, j)] + ranked
            dual = [math.exp(t_mat[i, j].item() / tau_t) for j in range(s_mat.shape[1])]
            dual = [x / sum(dual) for x in dual]
            if mix == "prob":
                fz = {j: math.exp(f_mat[i, j].item() / tau_f) for j in cand}
                target = [(1 - alpha) * dual[j] + alpha * fz.get(j, 0.0) / sum(fz.values())
                          for j in range(s_mat.shape[1])]
            else:
                floor = min(f_mat[i, j].item() for j in cand)
                z = [t_mat[i, j].item() / tau_t + (alpha * (f_mat[i, j].item() - floor) if j in cand else 0.0)
                     for j in range(s_mat.shape[1])]
                target = [math.exp(x) / sum(math.exp(y) for y in z) for x in z]
            student = [math.exp(s_mat[i, j].item() / tau_s) for j in range(s_mat.shape[1])]
            student = [x / sum(student) for x in student]
            total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, student) if p > 0)
        return total / n

    same = lambda i, j: ids[i] == ids[j]  # noqa: E731
    rows = one_direction(si @ st.t(), ti @ tt.t(), fused, same)
    if not columns:
        return rows
    cols = one_direction(st @ si.t(), tt @ ti.t(), fused.t(), same)
    return 0.5 * (rows + cols)


@pytest.mark.parametrize("mix,alpha,columns", [("prob", 0.5, True), ("prob", 1.0, False), ("logit", 0.7, True)])
def test_fused_kl_matches_written_out_formula(mix: str, alpha: float, columns: bool) -> None:
    b, d = 6, 8
    ids = torch.tensor([0, 1, 2, 2, 3, 4])  # rows 2 and 3 share an image
    si, st, ti, tt = (embeddings(b, d, s) for s in range(4))
    fused = torch.randn(b, b, generator=torch.Generator().manual_seed(9)) * 3
    loss_fn = LOSSES.get("fused_kl")(k=2, mix=mix, alpha=alpha, student_temperature=0.1,
                                     teacher_temperature=0.07, fused_temperature=0.5, columns=columns)
    got = loss_fn(si, st, ti, tt, table_scorer(fused, torch.zeros(b, b, 3)), ctx=EdgeContext(image_ids=ids))
    want = reference_fused_kl(si, st, ti, tt, fused, ids.tolist(), k=2, mix=mix, alpha=alpha, tau_s=0.1,
                              tau_t=0.07, tau_f=0.5, columns=columns)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_fused_kl_alpha_zero_is_similarity_kl_and_scores_only_candidates() -> None:
    b, d = 8, 8
    ids = torch.arange(b)
    si, st, ti, tt = (embeddings(b, d, s) for s in range(4))
    calls: list[int] = []
    scorer = table_scorer(torch.randn(b, b), torch.zeros(b, b, 2), calls)
    got = LOSSES.get("fused_kl")(k=2, alpha=0.0)(si, st, ti, tt, scorer, ctx=EdgeContext(image_ids=ids))
    want = LOSSES.get("similarity_kl")()(si, st, ti, tt, ctx=EdgeContext(image_ids=ids))
    torch.testing.assert_close(got, want)
    assert calls == []  # alpha = 0 reads nothing from the fused teacher
    LOSSES.get("fused_kl")(k=2, alpha=0.5)(si, st, ti, tt, scorer, ctx=EdgeContext(image_ids=ids))
    # positives (8) + top-2 per row and per column, deduplicated: at most 8 + 2*8*2 of the 64 pairs
    assert 8 + 2 * 8 <= sum(calls) <= 8 + 2 * 8 * 2


def test_fused_kl_gradient_reaches_only_the_student() -> None:
    b, d = 5, 4
    si, st = (embeddings(b, d, s).requires_grad_() for s in (0, 1))
    ti, tt = embeddings(b, d, 2), embeddings(b, d, 3)
    loss = LOSSES.get("fused_kl")(k=2)(si, st, ti, tt, table_scorer(torch.randn(b, b), torch.zeros(b, b, 2)),
                                       ctx=EdgeContext(image_ids=torch.arange(b)))
    loss.backward()
    assert si.grad is not None and st.grad is not None and torch.isfinite(si.grad).all()


def test_fused_feature_matches_written_out_formula() -> None:
    b, ds, dt, df = 5, 6, 4, 3
    si, st = embeddings(b, ds, 0), embeddings(b, ds, 1)
    ti, tt = embeddings(b, dt, 2), embeddings(b, dt, 3)
    feats = torch.randn(b, b, df, generator=torch.Generator().manual_seed(4))
    loss_fn = LOSSES.get("fused_feature")(beta=0.3)
    loss_fn.setup({"student_image": ds, "student_text": ds, "teacher_image": dt, "teacher_text": dt, "pair": df})
    got = loss_fn(si, st, ti, tt, table_scorer(torch.zeros(b, b), feats), ctx=EdgeContext(image_ids=torch.arange(b)))
    total = 0.0
    for i in range(b):
        f = feats[i, i] / feats[i, i].norm()
        for student, teacher, proj in ((si, ti, loss_fn.proj_image), (st, tt, loss_fn.proj_text)):
            target = torch.cat([math.sqrt(0.7) * teacher[i], math.sqrt(0.3) * f])
            p = proj.weight @ student[i]
            p = p / p.norm()
            total += ((p - target) ** 2).sum().item()
    assert got.item() == pytest.approx(total / (2 * b), rel=1e-5)


def test_fused_feature_beta_zero_reads_no_fused_information() -> None:
    b = 4
    si, st, ti, tt = (embeddings(b, 4, s) for s in range(4))
    loss_fn = LOSSES.get("fused_feature")(beta=0.0)
    loss_fn.setup({"student_image": 4, "student_text": 4, "teacher_image": 4, "teacher_text": 4, "pair": 3})
    ctx = EdgeContext(image_ids=torch.arange(b))
    calls: list[int] = []
    a = loss_fn(si, st, ti, tt, table_scorer(torch.zeros(b, b), torch.randn(b, b, 3), calls), ctx=ctx)
    c = loss_fn(si, st, ti, tt, table_scorer(torch.zeros(b, b), torch.randn(b, b, 3), calls), ctx=ctx)
    torch.testing.assert_close(a, c)
    assert calls == []
    # and equals the formula with the teacher part alone
    want = 0.5 * sum(((F.normalize(proj.weight @ s_.t(), dim=0).t() - torch.cat([t_, torch.zeros(b, 3)], 1)) ** 2
                      ).sum(1).mean() for s_, t_, proj in ((si, ti, loss_fn.proj_image), (st, tt, loss_fn.proj_text)))
    torch.testing.assert_close(a, want)


def test_frozen_scorer_memoises_pairs_across_calls() -> None:
    calls: list[int] = []
    logits, feats = torch.randn(4, 4), torch.randn(4, 4, 2)
    scorer = table_scorer(logits, feats, calls)
    i, t = torch.tensor([0, 1, 1, 3]), torch.tensor([0, 2, 2, 1])
    got, got_f = scorer(i, t)
    torch.testing.assert_close(got, logits[i, t])
    torch.testing.assert_close(got_f, feats[i, t])
    assert calls == [3]  # the repeated pair once
    again = scorer.scores(torch.tensor([3, 0, 2]), torch.tensor([1, 0, 2]))
    torch.testing.assert_close(again, logits[torch.tensor([3, 0, 2]), torch.tensor([1, 0, 2])])
    assert calls == [3, 1]  # only (2, 2) was new


@pytest.mark.parametrize("args,needle", [({"mix": "max"}, "mix"), ({"alpha": 1.5}, "alpha"), ({"k": -1}, "k")])
def test_fused_kl_bad_arguments(args: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LOSSES.get("fused_kl")(**args)


@pytest.mark.parametrize("alpha,columns", [(0.4, True), (1.0, False), (0.0, True)])
def test_fused_kl_feature_level_mix_matches_written_out_formula(alpha: float, columns: bool) -> None:
    """mix: feature: teacher features [sqrt(1-a) t_i ; sqrt(a) f_i] with f_i the aligned pair's
    fused feature; the KL is over all pairs and reads only the B aligned pairs."""
    b, d = 5, 8
    ids = torch.tensor([0, 1, 2, 3, 4])
    si, st, ti, tt = (embeddings(b, d, s) for s in range(4))
    feats = torch.randn(b, b, 6, generator=torch.Generator().manual_seed(7))
    calls: list[int] = []
    loss_fn = LOSSES.get("fused_kl")(mix="feature", alpha=alpha, student_temperature=0.1, teacher_temperature=0.07,
                                     columns=columns)
    got = loss_fn(si, st, ti, tt, table_scorer(torch.zeros(b, b), feats, calls), ctx=EdgeContext(image_ids=ids))
    f = [F.normalize(feats[i, i], dim=0) for i in range(b)]

    def kl(s_rows, t_rows):  # noqa: ANN001
        total = 0.0
        for srow, trow in zip(s_rows, t_rows):
            zs = math.log(sum(math.exp(x) for x in srow))
            zt = math.log(sum(math.exp(x) for x in trow))
            total += sum(math.exp(y - zt) * ((y - zt) - (x - zs)) for x, y in zip(srow, trow))
        return total / len(s_rows)

    s = [[float(si[i] @ st[j]) / 0.1 for j in range(b)] for i in range(b)]
    t = [[((1 - alpha) * float(ti[i] @ tt[j]) + alpha * float(f[i] @ f[j])) / 0.07 for j in range(b)] for i in range(b)]
    want = kl(s, t)
    if columns:
        want = 0.5 * (want + kl([list(c) for c in zip(*s)], [list(c) for c in zip(*t)]))
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sum(calls) == (b if alpha > 0 else 0)  # only the aligned pairs, none at alpha = 0
