"""Golden values of the token-level losses, each formula written out again here with loops
over plain Python floats; masks, head mappings, layer maps and per-sample locality."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.base import EdgeContext
from distill.models.intermediate import Tokens
from distill.registry import LOSSES

MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
"""Three samples of four positions: the second has two padded positions, the third one."""
CTX = EdgeContext(image_ids=torch.arange(3))


def states(seed: int, n: int, length: int, d: int) -> list[list[list[float]]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, d, generator=g).tolist()


def attention(seed: int, h: int, mask: list[list[int]] = MASK) -> list[list[list[list[float]]]]:
    """Rows that are distributions over each sample's real keys (padded keys 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(mask), h, 4, 4, generator=g)
    keys = torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    return logits.masked_fill(~keys, float("-inf")).softmax(-1).tolist()


def tokens(x: list, heads: int | None = None, mask: list[list[int]] = MASK) -> Tokens:
    return Tokens(torch.tensor(x, dtype=torch.float32), torch.tensor(mask, dtype=torch.bool), heads)


def real(n: int) -> list[int]:
    return [i for i, m in enumerate(MASK[n]) if m]


def kl(p: list[float], q: list[float], keys: list[int]) -> float:
    return sum(p[j] * math.log(p[j] / q[j]) for j in keys if p[j] > 0)


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run(name: str, args: dict, s: Tokens | list[Tokens], t: Tokens | list[Tokens], dims: dict | None = None) -> float:
    loss = LOSSES.get(name)(**args)
    if dims is not None:
        loss.setup(dims)
    return float(loss(s, t, ctx=CTX).detach())


def ref_hidden(s: list, t: list, w: list | None = None, c: list | None = None) -> float:
    per = []
    for n in range(3):
        terms = []
        for pos in real(n):
            x = s[n][pos]
            if w is not None:
                x = [sum(w[o][i] * x[i] for i in range(len(x))) + c[o] for o in range(len(w))]
            terms.append(mean([(a - b) ** 2 for a, b in zip(x, t[n][pos])]))
        per.append(mean(terms))
    return mean(per)


def test_hidden_mse_golden_equal_and_projected_widths() -> None:
    s, t = states(0, 3, 4, 3), states(1, 3, 4, 3)
    assert math.isclose(run("hidden_mse", {}, tokens(s), tokens(t)), ref_hidden(s, t), rel_tol=1e-5)
    s2 = states(2, 3, 4, 2)
    loss = LOSSES.get("hidden_mse")()
    loss.setup({"student": 2, "teacher": 3})
    w, c = loss.maps[0].weight.tolist(), loss.maps[0].bias.tolist()
    got = float(loss(tokens(s2), tokens(t), ctx=CTX).detach())
    assert math.isclose(got, ref_hidden(s2, t, w, c), rel_tol=1e-5)


def test_a_layer_map_is_the_mean_over_its_pairs_with_a_map_per_pair() -> None:
    s = [states(3, 3, 4, 2), states(4, 3, 4, 3)]
    t = [states(5, 3, 4, 3), states(6, 3, 4, 3)]
    loss = LOSSES.get("hidden_mse")()
    loss.setup({"student": (2, 3), "teacher": (3, 3)})
    assert isinstance(loss.maps[1], torch.nn.Identity)
    w, c = loss.maps[0].weight.tolist(), loss.maps[0].bias.tolist()
    got = float(loss([tokens(x) for x in s], [tokens(x) for x in t], ctx=CTX).detach())
    assert math.isclose(got, (ref_hidden(s[0], t[0], w, c) + ref_hidden(s[1], t[1])) / 2, rel_tol=1e-5)


def ref_attention(a_s: list, a_t: list, how: str) -> float:
    hs, ht = len(a_s[0]), len(a_t[0])

    def avg(rows: list[list[float]]) -> list[float]:
        return [mean([r[j] for r in rows]) for j in range(4)]

    per = []
    for n in range(3):
        if how == "mean":
            pairs = [(avg([a_s[n][h][q] for h in range(hs)]), avg([a_t[n][h][q] for h in range(ht)])) for q in range(4)]
            per_query = {q: [kl(pairs[q][1], pairs[q][0], real(n))] for q in range(4)}
        else:  # teacher heads averaged in contiguous groups onto the student's
            g = ht // hs
            per_query = {q: [kl(avg([a_t[n][h * g + k][q] for k in range(g)]), a_s[n][h][q], real(n)) for h in range(hs)]
                         for q in range(4)}
        per.append(mean([mean(per_query[q]) for q in real(n)]))
    return mean(per)


@pytest.mark.parametrize("how", ["group", "mean"])
def test_attention_kl_golden_with_head_mappings(how: str) -> None:
    a_s, a_t = attention(0, 2), attention(1, 4)
    got = run("attention_kl", {"heads": how}, tokens(a_s, 2), tokens(a_t, 4))
    assert math.isclose(got, ref_attention(a_s, a_t, how), rel_tol=1e-5)
    same = run("attention_kl", {"heads": how}, tokens(a_t, 4), tokens(a_t, 4))
    assert abs(same) < 1e-6


def ref_relation(v_s: list, v_t: list, r: int) -> float:
    def rel(v: list, n: int, head: int, q: int) -> list[float]:
        d = len(v[0][0]) // r
        vq = v[n][q][head * d:(head + 1) * d]
        logits = [sum(a * b for a, b in zip(vq, v[n][k][head * d:(head + 1) * d])) / math.sqrt(d) for k in real(n)]
        probs = dict(zip(real(n), softmax(logits)))
        return [probs.get(k, 0.0) for k in range(4)]

    per = []
    for n in range(3):
        per.append(mean([mean([kl(rel(v_t, n, h, q), rel(v_s, n, h, q), real(n)) for h in range(r)]) for q in real(n)]))
    return mean(per)


def test_value_relation_golden_with_relation_heads() -> None:
    v_s, v_t = states(7, 3, 4, 4), states(8, 3, 4, 6)
    got = run("value_relation", {}, tokens(v_s, 2), tokens(v_t, 3))  # heads: null = the student's 2
    assert math.isclose(got, ref_relation(v_s, v_t, 2), rel_tol=1e-5)
    got1 = run("value_relation", {"heads": 1}, tokens(v_s, 2), tokens(v_t, 3))
    assert math.isclose(got1, ref_relation(v_s, v_t, 1), rel_tol=1e-5)
    assert abs(run("value_relation", {}, tokens(v_t, 2), tokens(v_t, 2))) < 1e-6


def ref_pooled(s: list, t: list, distance: str, pool: str, normalize: bool, w: list | None, c: list | None) -> float:
    def pooled(x: list, n: int) -> list[float]:
        rows = [x[n][0]] if pool == "first" else [x[n][p] for p in real(n)]
        return [mean([r[d] for r in rows]) for d in range(len(rows[0]))]

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v]

    per = []
    for n in range(3):
        a, b = pooled(s, n), pooled(t, n)
        if w is not None:
            a = [sum(w[o][i] * a[i] for i in range(len(a))) + c[o] for o in range(len(w))]
        if normalize:
            a, b = unit(a), unit(b)
        if distance == "mse":
            per.append(sum((x - y) ** 2 for x, y in zip(a, b)))
        elif distance == "l1":
            per.append(sum(abs(x - y) for x, y in zip(a, b)))
        else:
            per.append(1 - sum(x * y for x, y in zip(unit(a), unit(b))))
    return mean(per)


@pytest.mark.parametrize("distance,pool,normalize", [("mse", "mean", False), ("l1", "mean", True),
                                                     ("cosine", "first", False), ("mse", "first", True)])
def test_token_feature_golden(distance: str, pool: str, normalize: bool) -> None:
    s, t = states(9, 3, 4, 2), states(10, 3, 4, 3)
    loss = LOSSES.get("token_feature")(distance=distance, pool=pool, normalize=normalize)
    loss.setup({"student": 2, "teacher": 3})
    w, c = loss.maps[0].weight.tolist(), loss.maps[0].bias.tolist()
    got = float(loss(tokens(s), tokens(t), ctx=CTX).detach())
    assert math.isclose(got, ref_pooled(s, t, distance, pool, normalize, w, c), rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("name,kind", [("hidden_mse", "hidden"), ("attention_kl", "attention"),
                                       ("value_relation", "values"), ("token_feature", "hidden")])
def test_per_sample_so_local_under_ddp_and_teacher_gets_no_gradient(name: str, kind: str) -> None:
    """The loss of a batch is the size-weighted mean of its parts' losses (no cross-sample
    term, hence `global_batch = False`); the student gets a gradient, the teacher none."""
    assert LOSSES.get(name).global_batch is False
    if kind == "attention":
        s, t = torch.tensor(attention(11, 2)), torch.tensor(attention(12, 2))
    else:
        s, t = torch.tensor(states(11, 3, 4, 4)), torch.tensor(states(12, 3, 4, 4))
    s.requires_grad_(True)
    t.requires_grad_(True)
    mask = torch.tensor(MASK, dtype=torch.bool)
    loss = LOSSES.get(name)()
    loss.setup({"student": 4, "teacher": 4})
    whole = loss(Tokens(s, mask, 2), Tokens(t, mask, 2), ctx=CTX)
    parts = [loss(Tokens(s[i], mask[i], 2), Tokens(t[i], mask[i], 2), ctx=CTX) for i in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(whole, (parts[0] + 2 * parts[1]) / 3)
    whole.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and t.grad is None


def test_misaligned_positions_are_refused_at_run_time() -> None:
    s = tokens(states(0, 3, 4, 3))
    t = Tokens(torch.randn(3, 5, 3), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="student and teacher positions differ"):
        run("hidden_mse", {}, s, t)
    assert math.isfinite(run("token_feature", {}, s, t))  # pooled: any two sequences
