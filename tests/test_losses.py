"""Tests of the loss library (`distill.losses`).

Every expected value here comes from a reference written out independently in plain Python
(lists of floats, explicit loops, `math.exp` / `math.log`); the library's helpers
(`soft_targets`, `kl_rows`, `cross_entropy_soft`, ...) are never used to compute an
expectation.

The golden fixture `tests/fixtures/losses_golden.json` holds seeded inputs and the values of
the independent references on them. Regenerate it (from the references, never from the
library) with:

    .venv/bin/python tests/test_losses.py --regen
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tests/test_losses.py --regen` and bare pytest
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.losses.base import EdgeContext  # noqa: E402
from distill.registry import LOSSES  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "losses_golden.json"
RTOL = 1e-5
ATOL = 1e-6

UNIQUE_IDS = [0, 1, 2, 3, 4]
# Rows 1 and 2 are two captions of one image, rows 3 and 4 too.
DUP_IDS = [7, 3, 3, 9, 9]


# --------------------------------------------------------------------------------------
# Independent references (pure Python on nested lists)
# --------------------------------------------------------------------------------------


def _dot(u: list[float], v: list[float]) -> float:
    total = 0.0
    for x, y in zip(u, v, strict=True):
        total += x * y
    return total


def _sim(xs: list[list[float]], ys: list[list[float]]) -> list[list[float]]:
    return [[_dot(x, y) for y in ys] for x in xs]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [[m[i][j] for i in range(len(m))] for j in range(len(m[0]))]


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = 0.0
    for r in row:
        total += math.exp(r - top)
    lse = top + math.log(total)
    return [r - lse for r in row]


def _norm(v: list[float]) -> float:
    return math.sqrt(_dot(v, v))


def _soft_ce(logits: list[list[float]], ids: list[int]) -> float:
    """Mean over rows of -sum_j t_ij log softmax(logits_i)_j, t uniform over same-id rows."""
    total = 0.0
    for i, row in enumerate(logits):
        logp = _log_softmax(row)
        positives = [j for j in range(len(row)) if ids[j] == ids[i]]
        row_loss = 0.0
        for j in positives:
            row_loss -= logp[j] / len(positives)
        total += row_loss
    return total / len(logits)


def ref_infonce(a, b, ids, *, temperature=0.07, max_logit_scale=100.0) -> float:
    scale = min(1.0 / temperature, max_logit_scale)
    s = _sim(a, b)
    logits = [[scale * v for v in row] for row in s]
    return 0.5 * (_soft_ce(logits, ids) + _soft_ce(_transpose(logits), ids))


def ref_triplet(a, b, ids, *, margin=0.2, hardest=True) -> float:
    s = _sim(a, b)
    n = len(s)
    total = 0.0
    for i in range(n):
        negatives = [j for j in range(n) if ids[j] != ids[i]]
        # image-to-text direction: row i against the other columns
        hinges_ab = [max(0.0, margin - s[i][i] + s[i][j]) for j in negatives]
        # text-to-image direction: column i against the other rows
        hinges_ba = [max(0.0, margin - s[i][i] + s[j][i]) for j in negatives]
        if hardest:
            total += (max(hinges_ab) if hinges_ab else 0.0) + (max(hinges_ba) if hinges_ba else 0.0)
        else:
            total += sum(hinges_ab) + sum(hinges_ba)
    return total / n


def ref_feature(a, b, *, distance="mse") -> float:
    total = 0.0
    for x, y in zip(a, b, strict=True):
        if distance == "mse":
            total += sum((xi - yi) ** 2 for xi, yi in zip(x, y, strict=True))
        elif distance == "l1":
            total += sum(abs(xi - yi) for xi, yi in zip(x, y, strict=True))
        elif distance == "cosine":
            total += 1.0 - _dot(x, y) / (_norm(x) * _norm(y))
        else:
            raise ValueError(distance)
    return total / len(a)


def _kl_rows(teacher: list[list[float]], student: list[list[float]]) -> float:
    total = 0.0
    for t_row, s_row in zip(teacher, student, strict=True):
        lt, ls = _log_softmax(t_row), _log_softmax(s_row)
        for x, y in zip(lt, ls, strict=True):
            total += math.exp(x) * (x - y)
    return total / len(teacher)


def ref_similarity_kl(
    sa, sb, ta, tb, *, student_temperature=0.05, teacher_temperature=0.05, columns=True
) -> float:
    s = [[v / student_temperature for v in row] for row in _sim(sa, sb)]
    t = [[v / teacher_temperature for v in row] for row in _sim(ta, tb)]
    loss = _kl_rows(t, s)
    if columns:
        loss = 0.5 * (loss + _kl_rows(_transpose(t), _transpose(s)))
    return loss


def ref_similarity_mse(sa, sb, ta, tb, *, scale=1.0) -> float:
    s, t = _sim(sa, sb), _sim(ta, tb)
    total = 0.0
    count = 0
    for s_row, t_row in zip(s, t, strict=True):
        for x, y in zip(s_row, t_row, strict=True):
            total += (x - y) ** 2
            count += 1
    return scale * total / count


REFERENCES = {
    "infonce": ref_infonce,
    "triplet": ref_triplet,
    "feature": ref_feature,
    "similarity_kl": ref_similarity_kl,
    "similarity_mse": ref_similarity_mse,
}


# --------------------------------------------------------------------------------------
# Inputs and cases
# --------------------------------------------------------------------------------------


def seeded_inputs(seed: int = 0, n: int = 4, batch: int = 5, dim: int = 4) -> list[torch.Tensor]:
    """`n` L2-normalised (batch, dim) float32 embeddings, drawn in float64 from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, dim, dtype=torch.float64, generator=gen)
        out.append((x / x.norm(dim=-1, keepdim=True)).float())
    return out


def to_lists(t: torch.Tensor) -> list[list[float]]:
    """float32 tensor -> exact float lists (every float32 is a float64)."""
    return t.double().tolist()


def ctx_for(ids: list[int]) -> EdgeContext:
    return EdgeContext(image_ids=torch.tensor(ids))


def run_loss(name: str, kwargs: dict, xs: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    loss = LOSSES.get(name)(**kwargs)
    return loss(*xs, ctx=ctx_for(ids))


# (case name, loss, kwargs, indices into the input list, ids)
CASES = [
    ("infonce_fixed_unique", "infonce", {"temperature": 0.07}, [0, 1], UNIQUE_IDS),
    ("infonce_fixed_dup", "infonce", {"temperature": 0.07}, [0, 1], DUP_IDS),
    ("infonce_learnable_unique", "infonce", {"temperature": 0.1, "learnable": True}, [0, 1], UNIQUE_IDS),
    ("infonce_learnable_dup", "infonce", {"temperature": 0.1, "learnable": True}, [0, 1], DUP_IDS),
    (
        "infonce_learnable_at_cap_dup",
        "infonce",
        {"temperature": 0.01, "learnable": True, "max_logit_scale": 100.0},
        [0, 1],
        DUP_IDS,
    ),
    ("triplet_hardest_unique", "triplet", {"margin": 0.2, "hardest": True}, [0, 1], UNIQUE_IDS),
    ("triplet_hardest_dup", "triplet", {"margin": 0.2, "hardest": True}, [0, 1], DUP_IDS),
    ("triplet_sum_unique", "triplet", {"margin": 0.5, "hardest": False}, [0, 1], UNIQUE_IDS),
    ("triplet_sum_dup", "triplet", {"margin": 0.5, "hardest": False}, [0, 1], DUP_IDS),
    ("triplet_hardest_margin1_dup", "triplet", {"margin": 1.0, "hardest": True}, [0, 1], DUP_IDS),
    ("feature_mse", "feature", {"distance": "mse"}, [0, 1], UNIQUE_IDS),
    ("feature_l1", "feature", {"distance": "l1"}, [0, 1], UNIQUE_IDS),
    ("feature_cosine", "feature", {"distance": "cosine"}, [0, 1], UNIQUE_IDS),
    (
        "similarity_kl_rows",
        "similarity_kl",
        {"student_temperature": 0.1, "teacher_temperature": 0.05, "columns": False},
        [0, 1, 2, 3],
        DUP_IDS,
    ),
    (
        "similarity_kl_columns",
        "similarity_kl",
        {"student_temperature": 0.1, "teacher_temperature": 0.05, "columns": True},
        [0, 1, 2, 3],
        DUP_IDS,
    ),
    (
        "similarity_kl_intramodal_columns",
        "similarity_kl",
        {"student_temperature": 0.2, "teacher_temperature": 0.2, "columns": True},
        [0, 0, 2, 2],
        UNIQUE_IDS,
    ),
    ("similarity_mse", "similarity_mse", {}, [0, 1, 2, 3], DUP_IDS),
    ("similarity_mse_scaled", "similarity_mse", {"scale": 3.0}, [0, 2, 1, 3], DUP_IDS),
]


def reference_value(name: str, kwargs: dict, xs: list[list[list[float]]], ids: list[int]) -> float:
    ref = REFERENCES[name]
    if name in ("infonce", "triplet"):
        kw = {k: v for k, v in kwargs.items() if k != "learnable"}
        return ref(*xs, ids, **kw)
    return ref(*xs, **kwargs)


def build_golden(seed: int = 0) -> dict:
    tensors = seeded_inputs(seed)
    inputs = [to_lists(t) for t in tensors]
    cases = []
    for case, name, kwargs, idx, ids in CASES:
        xs = [inputs[i] for i in idx]
        cases.append(
            {
                "case": case,
                "loss": name,
                "kwargs": kwargs,
                "inputs": idx,
                "image_ids": ids,
                "expected": reference_value(name, kwargs, xs, ids),
            }
        )
    return {
        "about": "Seeded inputs and loss values from the independent references in "
        "tests/test_losses.py; regenerate with `python tests/test_losses.py --regen`.",
        "seed": seed,
        "batch": 5,
        "dim": 4,
        "inputs": inputs,
        "cases": cases,
    }


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL)


# --------------------------------------------------------------------------------------
# 1. Library vs the independent formulas
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,name,kwargs,idx,ids", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_independent_formula(seed, case, name, kwargs, idx, ids):
    tensors = seeded_inputs(seed)
    xs = [tensors[i] for i in idx]
    got = run_loss(name, kwargs, xs, ids).item()
    want = reference_value(name, kwargs, [to_lists(x) for x in xs], ids)
    assert _close(got, want), f"{case}: library {got!r} vs reference {want!r}"


def test_infonce_duplicate_ids_change_the_targets():
    a, b, *_ = seeded_inputs(3)
    # a duplicate id makes the two captions non-negatives: the value must change
    unique = run_loss("infonce", {}, [a, b], UNIQUE_IDS).item()
    dup = run_loss("infonce", {}, [a, b], DUP_IDS).item()
    assert not math.isclose(unique, dup, rel_tol=1e-4)
    assert _close(dup, ref_infonce(to_lists(a), to_lists(b), DUP_IDS))


def test_infonce_is_symmetric_in_its_inputs():
    a, b, *_ = seeded_inputs(4)
    ab = run_loss("infonce", {}, [a, b], DUP_IDS).item()
    ba = run_loss("infonce", {}, [b, a], DUP_IDS).item()
    assert _close(ab, ba)


def test_triplet_ignores_same_image_rows_as_negatives():
    # Row 1 and 2 share an image; make row 2's text identical to row 1's so it would be the
    # hardest "negative" of row 1 if same-id rows were not excluded.
    a, b, *_ = seeded_inputs(5)
    b = b.clone()
    b[2] = a[1]
    got = run_loss("triplet", {"margin": 0.2}, [a, b], DUP_IDS).item()
    assert _close(got, ref_triplet(to_lists(a), to_lists(b), DUP_IDS, margin=0.2))
    with_dup_as_negative = ref_triplet(to_lists(a), to_lists(b), UNIQUE_IDS, margin=0.2)
    assert got < with_dup_as_negative


# --------------------------------------------------------------------------------------
# 2. Golden fixture
# --------------------------------------------------------------------------------------


def test_golden_fixture_matches_library():
    golden = load_golden()
    inputs = [torch.tensor(x, dtype=torch.float32) for x in golden["inputs"]]
    assert len(golden["cases"]) == len(CASES)
    for c in golden["cases"]:
        xs = [inputs[i] for i in c["inputs"]]
        got = run_loss(c["loss"], c["kwargs"], xs, c["image_ids"]).item()
        assert _close(got, c["expected"]), f"{c['case']}: library {got!r} vs golden {c['expected']!r}"


def test_golden_fixture_is_current():
    """The fixture agrees with the references (it was not edited by hand or left stale)."""
    golden = load_golden()
    for c in golden["cases"]:
        xs = [golden["inputs"][i] for i in c["inputs"]]
        want = reference_value(c["loss"], c["kwargs"], xs, c["image_ids"])
        assert math.isclose(want, c["expected"], rel_tol=1e-12, abs_tol=1e-12), c["case"]


# --------------------------------------------------------------------------------------
# 3. Properties
# --------------------------------------------------------------------------------------


def test_student_equal_to_teacher_gives_zero():
    a, b, *_ = seeded_inputs(6)
    kl = run_loss(
        "similarity_kl",
        {"student_temperature": 0.07, "teacher_temperature": 0.07, "columns": True},
        [a, b, a, b],
        DUP_IDS,
    ).item()
    assert abs(kl) < 1e-6
    for distance in ("mse", "l1", "cosine"):
        assert abs(run_loss("feature", {"distance": distance}, [a, a], DUP_IDS).item()) < 1e-6
    assert run_loss("similarity_mse", {}, [a, b, a, b], DUP_IDS).item() == 0.0


def test_infonce_lower_when_aligned():
    gen = torch.Generator().manual_seed(7)
    a = nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    noise = nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    ids = list(range(8))
    aligned = run_loss("infonce", {}, [a, a], ids).item()
    nearly = run_loss("infonce", {}, [a, nn.functional.normalize(a + 0.3 * noise, dim=-1)], ids).item()
    random = run_loss("infonce", {}, [a, noise], ids).item()
    assert aligned < nearly < random


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("columns", [False, True])
def test_kl_is_non_negative(seed, columns):
    xs = seeded_inputs(10 + seed)
    kwargs = {"student_temperature": 0.05, "teacher_temperature": 0.1, "columns": columns}
    assert run_loss("similarity_kl", kwargs, xs, DUP_IDS).item() >= 0.0


def check_finite_and_differentiable(cls: type) -> None:
    """A loss built with its defaults gives a finite scalar on a batch with duplicate image
    ids, and finite gradients that reach at least one input (also run over plugin losses:
    `pytest tests/test_losses.py --distill-plugins my_edges`)."""
    loss = cls()
    dim = 8
    gen = torch.Generator().manual_seed(11)
    xs = [
        nn.functional.normalize(torch.randn(6, dim, generator=gen), dim=-1).requires_grad_(True)
        for _ in cls.inputs
    ]
    loss.setup({slot: dim for slot in cls.inputs})
    ctx = EdgeContext(image_ids=torch.tensor([0, 1, 1, 2, 3, 3]), keys=[f"k{i}" for i in range(6)])
    out = loss(*xs, ctx=ctx)
    assert out.dim() == 0
    assert torch.isfinite(out)
    out.backward()
    grads = [x.grad for x in xs if x.grad is not None]
    assert grads, f"{cls.__name__}: no input received a gradient"
    for g in grads:
        assert torch.isfinite(g).all()
    for p in loss.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_and_differentiable(name):
    cls = LOSSES.get(name)
    if "pair" in cls.inputs:
        pytest.skip("pair-scorer inputs: tests/test_fusion.py (itm) and tests/test_fused_losses.py (fused_*)")
    if name == "hard_negative":
        pytest.skip("needs mined negatives; exercised in tests/test_index.py")
    if cls.reads:
        pytest.skip("layer-node (token) inputs: tests/test_token_losses.py")
    check_finite_and_differentiable(cls)


# --------------------------------------------------------------------------------------
# 4. Projection
# --------------------------------------------------------------------------------------


def test_feature_projection_between_widths():
    loss = LOSSES.get("feature")(distance="mse")
    dims = {"student": 6, "teacher": 4}
    assert loss.dim_problem(dims) is None
    loss.setup(dims)
    assert isinstance(loss.proj, nn.Linear)
    assert (loss.proj.in_features, loss.proj.out_features) == (6, 4)
    assert any(p is loss.proj.weight for p in loss.parameters())

    gen = torch.Generator().manual_seed(12)
    student = nn.functional.normalize(torch.randn(5, 6, generator=gen), dim=-1)
    teacher = nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    out = loss(student, teacher, ctx=ctx_for(UNIQUE_IDS))
    assert torch.isfinite(out)
    out.backward()
    assert loss.proj.weight.grad is not None and torch.isfinite(loss.proj.weight.grad).all()

    # independent value: P a, re-normalised, then squared distance
    w = loss.proj.weight.detach().double().tolist()
    projected = []
    for row in to_lists(student):
        y = [_dot(w_k, row) for w_k in w]
        n = _norm(y)
        projected.append([v / n for v in y])
    assert _close(out.item(), ref_feature(projected, to_lists(teacher), distance="mse"))


def test_no_projection_when_widths_match():
    loss = LOSSES.get("feature")()
    loss.setup({"student": 4, "teacher": 4})
    assert loss.proj is None


def test_dim_problem_for_non_projectable_loss():
    loss = LOSSES.get("similarity_mse")()
    msg = loss.dim_problem({"student_a": 6, "student_b": 4, "teacher_a": 4, "teacher_b": 4})
    assert isinstance(msg, str) and msg
    assert loss.dim_problem({"student_a": 4, "student_b": 4, "teacher_a": 8, "teacher_b": 8}) is None
    # student and teacher widths may differ (similarity matrices are B x B either way)


# --------------------------------------------------------------------------------------
# 5. infonce temperature
# --------------------------------------------------------------------------------------


def test_infonce_learnable_logit_scale_gets_gradient():
    loss = LOSSES.get("infonce")(temperature=0.07, learnable=True)
    assert isinstance(loss.logit_scale, nn.Parameter)
    assert any(p is loss.logit_scale for p in loss.parameters())
    assert math.isclose(loss.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    a, b, *_ = seeded_inputs(13)
    loss(a, b, ctx=ctx_for(DUP_IDS)).backward()
    g = loss.logit_scale.grad
    assert g is not None and torch.isfinite(g) and g.item() != 0.0


def test_infonce_fixed_temperature_is_not_a_parameter():
    loss = LOSSES.get("infonce")(temperature=0.07)
    assert not isinstance(loss.logit_scale, nn.Parameter)
    assert list(loss.parameters()) == []
    assert "logit_scale" in dict(loss.named_buffers())


def test_infonce_scale_is_clamped():
    loss = LOSSES.get("infonce")(temperature=0.01, learnable=True, max_logit_scale=100.0)
    assert math.isclose(loss.scale().item(), 100.0, rel_tol=1e-6)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1e4))  # as if training pushed it beyond the cap
    assert math.isclose(loss.scale().item(), 100.0, rel_tol=1e-6)
    a, b, *_ = seeded_inputs(14)
    got = loss(a, b, ctx=ctx_for(DUP_IDS)).item()
    assert _close(got, ref_infonce(to_lists(a), to_lists(b), DUP_IDS, temperature=0.01))

    small_cap = LOSSES.get("infonce")(temperature=0.05, learnable=True, max_logit_scale=20.0)
    with torch.no_grad():
        small_cap.logit_scale.fill_(math.log(50.0))
    assert math.isclose(small_cap.scale().item(), 20.0, rel_tol=1e-6)
    got = small_cap(a, b, ctx=ctx_for(DUP_IDS)).item()
    assert _close(got, ref_infonce(to_lists(a), to_lists(b), DUP_IDS, temperature=0.05))


@pytest.mark.parametrize("learnable", [False, True])
def test_infonce_refuses_a_temperature_the_cap_would_raise(learnable):
    """Below 1/max_logit_scale the clamp would silently train at another temperature."""
    from distill.losses.base import ArgumentError

    with pytest.raises(ArgumentError, match="below 1/max_logit_scale") as info:
        LOSSES.get("infonce")(temperature=0.005, learnable=learnable)
    assert info.value.argument == "temperature"
    LOSSES.get("infonce")(temperature=0.005, learnable=learnable, max_logit_scale=200.0)  # VLDeformer's


# --------------------------------------------------------------------------------------
# 6. Bad hyperparameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("feature", {"distance": "l3"}),
        ("infonce", {"temperature": 0}),
        ("infonce", {"temperature": -0.07}),
        ("similarity_kl", {"student_temperature": 0}),
        ("similarity_kl", {"teacher_temperature": -1.0}),
    ],
)
def test_bad_hyperparameters_raise(name, kwargs):
    with pytest.raises(ValueError):
        LOSSES.get(name)(**kwargs)


# --------------------------------------------------------------------------------------


if __name__ == "__main__":
    if "--regen" not in sys.argv[1:]:
        sys.exit("usage: python tests/test_losses.py --regen   (rewrites tests/fixtures/losses_golden.json)")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(build_golden(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.mark.parametrize("seed", [4, 5])
def test_similarity_kl_exclude_self_leaves_same_image_pairs_out(seed):
    """The same KL, written out over the pairs of different images only (rows and columns)."""
    sa, _, ta, _ = seeded_inputs(seed)
    ids = DUP_IDS
    kwargs = {"student_temperature": 0.05, "teacher_temperature": 0.1, "columns": True}
    got = run_loss("similarity_kl", {**kwargs, "exclude_self": True}, [sa, sa, ta, ta], ids).item()
    s, t = _sim(to_lists(sa), to_lists(sa)), _sim(to_lists(ta), to_lists(ta))

    def kl(t_rows, s_rows):
        total = 0.0
        for i, (t_row, s_row) in enumerate(zip(t_rows, s_rows)):
            keep = [j for j in range(len(t_row)) if ids[j] != ids[i]]
            lt = [t_row[j] / 0.1 for j in keep]
            ls = [s_row[j] / 0.05 for j in keep]
            zt, zs = math.log(sum(math.exp(x) for x in lt)), math.log(sum(math.exp(x) for x in ls))
            total += sum(math.exp(x - zt) * ((x - zt) - (y - zs)) for x, y in zip(lt, ls))
        return total / len(t_rows)

    want = 0.5 * (kl(t, s) + kl(_transpose(t), _transpose(s)))
    assert _close(got, want), (got, want)
    plain = run_loss("similarity_kl", kwargs, [sa, sa, ta, ta], ids).item()
    assert not _close(plain, want)  # the diagonal does change the value
