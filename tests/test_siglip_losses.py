"""Tests of the sigmoid losses (`distill/losses/sigmoid.py`): `siglip` and `sigmoid_kd`.

Every expected value comes from a reference written out here in plain Python (lists of
floats, explicit loops over the pairs, `math.exp` / `math.log`); the library's helpers are
never used to compute an expectation.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import Batch
from distill.core.graph import Edge, KnowledgeGraph
from distill.losses.base import ArgumentError, EdgeContext
from distill.registry import LOSSES
from tests.test_ddp import D_IN, ROWS, VOCAB, LinearDual, spawn

RTOL = 1e-5
ATOL = 1e-6

# A tiny hand-made batch of unit vectors (3-4-5 triangles, so every norm is exactly 1).
A = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]]
B = [[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 1.0, 0.0], [0.0, 0.8, 0.6]]
A2 = [[0.0, 0.8, 0.6], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.6, 0.0]]
B2 = [[0.0, 0.0, 1.0], [0.8, 0.0, 0.6], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
UNIQUE_IDS = [0, 1, 2, 3]
DUP_IDS = [5, 5, 6, 7]  # rows 0 and 1 are two captions of one image


# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------


def _dot(u: list[float], v: list[float]) -> float:
    total = 0.0
    for x, y in zip(u, v, strict=True):
        total += x * y
    return total


def _log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_siglip(a, b, ids, *, scale=10.0, bias=-10.0) -> float:
    """-(1/B) sum_ij log sigmoid(y_ij z_ij), z_ij = t a_i.b_j + bias, y = +1 on same image."""
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * _dot(a[i], b[j]) + bias
            y = 1.0 if ids[i] == ids[j] else -1.0
            total -= _log_sigmoid(y * z)
    return total / n


def ref_siglip_grads(a, b, ids, *, scale=10.0, bias=-10.0) -> tuple[float, float]:
    """(dL/dt', dL/dbias) with t = exp(t'): d/dz[-log sigmoid(yz)] = -y (1 - sigmoid(yz))."""
    n = len(a)
    d_log_scale, d_bias = 0.0, 0.0
    for i in range(n):
        for j in range(n):
            s = _dot(a[i], b[j])
            z = scale * s + bias
            y = 1.0 if ids[i] == ids[j] else -1.0
            dz = -y * (1.0 - _sigmoid(y * z)) / n
            d_bias += dz
            d_log_scale += dz * scale * s  # dz/dt' = t * s
    return d_log_scale, d_bias


def ref_sigmoid_kd(sa, sb, ta, tb, *, student_scale=10.0, student_bias=-10.0,
                   teacher_scale=10.0, teacher_bias=-10.0) -> float:
    """(1/B) sum_ij KL(Bernoulli(sigmoid(z^t_ij)) || Bernoulli(sigmoid(z^s_ij)))."""
    n = len(sa)
    total = 0.0
    for i in range(n):
        for j in range(n):
            p = _sigmoid(teacher_scale * _dot(ta[i], tb[j]) + teacher_bias)
            q = _sigmoid(student_scale * _dot(sa[i], sb[j]) + student_bias)
            total += p * math.log(p / q) + (1.0 - p) * math.log((1.0 - p) / (1.0 - q))
    return total / n


def t(x: list[list[float]], grad: bool = False) -> Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def ctx_for(ids: list[int]) -> EdgeContext:
    return EdgeContext(image_ids=torch.tensor(ids))


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL)


# --------------------------------------------------------------------------------------
# siglip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [UNIQUE_IDS, DUP_IDS], ids=["unique", "two_captions"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"learnable": False}, {"scale": 5.0, "bias": -2.0}, {"scale": 1.0, "bias": 0.0, "learnable": False}],
    ids=["default", "fixed", "custom_init", "unit_scale"],
)
def test_siglip_matches_pairwise_formula(kwargs, ids):
    loss = LOSSES.get("siglip")(**kwargs)
    got = loss(t(A), t(B), ctx=ctx_for(ids)).item()
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "learnable"}
    want = ref_siglip(A, B, ids, **ref_kwargs)
    assert _close(got, want), (got, want)


def test_siglip_closed_form_on_two_orthogonal_pairs():
    """a = b = I_2, t = 10, bias = -10: z = [[0, -10], [-10, 0]], so
    L = -(1/2)[2 log sigmoid(0) + 2 log sigmoid(10)] = log 2 + log(1 + e^-10)."""
    eye = [[1.0, 0.0], [0.0, 1.0]]
    got = LOSSES.get("siglip")()(t(eye), t(eye), ctx=ctx_for([0, 1])).item()
    assert _close(got, math.log(2.0) + math.log(1.0 + math.exp(-10.0)))


def test_siglip_two_captions_of_one_image_are_positives():
    loss = LOSSES.get("siglip")()
    unique = loss(t(A), t(B), ctx=ctx_for(UNIQUE_IDS)).item()
    dup = loss(t(A), t(B), ctx=ctx_for(DUP_IDS)).item()
    assert not math.isclose(unique, dup, rel_tol=1e-4)  # pairs (0, 1) and (1, 0) flipped sign
    assert _close(dup, ref_siglip(A, B, DUP_IDS))
    # the same value computed by hand from the unique-id one: only the labels of (0,1), (1,0) change
    by_hand = unique * 4
    for i, j in ((0, 1), (1, 0)):
        z = 10.0 * _dot(A[i], B[j]) - 10.0
        by_hand += _log_sigmoid(-z) - _log_sigmoid(z)
    assert _close(dup, by_hand / 4)


def test_siglip_is_symmetric_in_its_inputs():
    loss = LOSSES.get("siglip")()
    ab = loss(t(A), t(B), ctx=ctx_for(DUP_IDS)).item()
    ba = loss(t(B), t(A), ctx=ctx_for(DUP_IDS)).item()
    assert _close(ab, ba)


def test_siglip_initial_scale_and_bias():
    loss = LOSSES.get("siglip")()
    assert isinstance(loss.logit_scale, nn.Parameter) and isinstance(loss.logit_bias, nn.Parameter)
    assert math.isclose(loss.logit_scale.item(), math.log(10.0), rel_tol=1e-6)  # t' = log 10
    assert math.isclose(loss.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    assert loss.logit_bias.item() == -10.0
    assert {n for n, _ in loss.named_parameters()} == {"logit_scale", "logit_bias"}

    custom = LOSSES.get("siglip")(scale=3.0, bias=-4.5)
    assert math.isclose(custom.logit_scale.exp().item(), 3.0, rel_tol=1e-6)
    assert custom.logit_bias.item() == -4.5

    fixed = LOSSES.get("siglip")(learnable=False)
    assert list(fixed.parameters()) == []
    assert set(dict(fixed.named_buffers())) == {"logit_scale", "logit_bias"}
    assert math.isclose(fixed.logit_scale.exp().item(), 10.0, rel_tol=1e-6)


@pytest.mark.parametrize("ids", [UNIQUE_IDS, DUP_IDS], ids=["unique", "two_captions"])
def test_siglip_gradients_reach_scale_and_bias(ids):
    loss = LOSSES.get("siglip")(scale=4.0, bias=-3.0)
    a, b = t(A, grad=True), t(B, grad=True)
    loss(a, b, ctx=ctx_for(ids)).backward()
    want_scale, want_bias = ref_siglip_grads(A, B, ids, scale=4.0, bias=-3.0)
    assert _close(loss.logit_scale.grad.item(), want_scale), (loss.logit_scale.grad, want_scale)
    assert _close(loss.logit_bias.grad.item(), want_bias), (loss.logit_bias.grad, want_bias)
    assert a.grad is not None and b.grad is not None
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_siglip_projection_between_widths():
    loss = LOSSES.get("siglip")(learnable=False)
    dims = {"a": 5, "b": 3}
    assert loss.dim_problem(dims) is None
    loss.setup(dims)
    assert isinstance(loss.proj, nn.Linear) and (loss.proj.in_features, loss.proj.out_features) == (5, 3)
    gen = torch.Generator().manual_seed(3)
    wide = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    out = loss(wide, t(B), ctx=ctx_for(DUP_IDS))
    out.backward()
    assert loss.proj.weight.grad is not None and torch.isfinite(loss.proj.weight.grad).all()
    # independent value: P a, re-normalised, then the pairwise formula
    w = loss.proj.weight.detach().double().tolist()
    projected = []
    for row in wide.double().tolist():
        y = [_dot(w_k, row) for w_k in w]
        norm = math.sqrt(_dot(y, y))
        projected.append([v / norm for v in y])
    assert _close(out.item(), ref_siglip(projected, B, DUP_IDS))


# --------------------------------------------------------------------------------------
# sigmoid_kd
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"teacher_scale": 20.0, "teacher_bias": -12.0},
        {"student_scale": 5.0, "student_bias": -3.0, "teacher_scale": 15.0, "teacher_bias": -8.0},
        {"student_scale": 5.0, "student_bias": -3.0, "learnable": True},
    ],
    ids=["default", "teacher_args", "all_args", "learnable_student"],
)
def test_sigmoid_kd_matches_pairwise_formula(kwargs):
    loss = LOSSES.get("sigmoid_kd")(**kwargs)
    got = loss(t(A), t(B), t(A2), t(B2), ctx=ctx_for(DUP_IDS)).item()
    want = ref_sigmoid_kd(A, B, A2, B2, **{k: v for k, v in kwargs.items() if k != "learnable"})
    assert _close(got, want), (got, want)


def test_sigmoid_kd_is_zero_when_the_student_matches_the_teacher():
    loss = LOSSES.get("sigmoid_kd")(student_scale=7.0, student_bias=-5.0, teacher_scale=7.0, teacher_bias=-5.0)
    assert abs(loss(t(A), t(B), t(A), t(B), ctx=ctx_for(UNIQUE_IDS)).item()) < 1e-6
    assert loss(t(A), t(B), t(A2), t(B2), ctx=ctx_for(UNIQUE_IDS)).item() > 0.0


def test_sigmoid_kd_teacher_side_is_detached_and_fixed():
    loss = LOSSES.get("sigmoid_kd")()
    assert list(loss.parameters()) == []
    sa, sb, ta, tb = t(A, True), t(B, True), t(A2, True), t(B2, True)
    loss(sa, sb, ta, tb, ctx=ctx_for(DUP_IDS)).backward()
    assert ta.grad is None and tb.grad is None
    assert sa.grad is not None and sb.grad is not None and sa.grad.abs().sum() > 0


def test_sigmoid_kd_has_the_gradient_of_the_soft_binary_cross_entropy():
    """KL and BCE with soft targets differ by the teacher entropy only (the docstring's claim)."""
    loss = LOSSES.get("sigmoid_kd")(student_scale=6.0, student_bias=-4.0)
    sa, sb = t(A, True), t(B, True)
    loss(sa, sb, t(A2), t(B2), ctx=ctx_for(DUP_IDS)).backward()
    sa2, sb2 = t(A, True), t(B, True)
    target = torch.sigmoid(10.0 * t(A2) @ t(B2).t() - 10.0)
    logits = 6.0 * sa2 @ sb2.t() - 4.0
    (F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 4).backward()
    torch.testing.assert_close(sa.grad, sa2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sb.grad, sb2.grad, rtol=1e-5, atol=1e-6)


def test_sigmoid_kd_learnable_student_scale_and_bias_get_gradients():
    loss = LOSSES.get("sigmoid_kd")(student_scale=4.0, student_bias=-2.0, learnable=True)
    assert {n for n, _ in loss.named_parameters()} == {"logit_scale", "logit_bias"}
    assert math.isclose(loss.logit_scale.exp().item(), 4.0, rel_tol=1e-6) and loss.logit_bias.item() == -2.0
    loss(t(A), t(B), t(A2), t(B2), ctx=ctx_for(DUP_IDS)).backward()
    for p in (loss.logit_scale, loss.logit_bias):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.item() != 0.0


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,argument",
    [
        ("siglip", {"scale": 0.0}, "scale"),
        ("siglip", {"scale": -10.0}, "scale"),
        ("siglip", {"scale": math.inf}, "scale"),
        ("siglip", {"scale": math.nan}, "scale"),
        ("siglip", {"bias": math.inf}, "bias"),
        ("siglip", {"bias": math.nan}, "bias"),
        ("sigmoid_kd", {"student_scale": 0.0}, "student_scale"),
        ("sigmoid_kd", {"teacher_scale": -1.0}, "teacher_scale"),
        ("sigmoid_kd", {"student_bias": -math.inf}, "student_bias"),
        ("sigmoid_kd", {"teacher_bias": math.nan}, "teacher_bias"),
    ],
)
def test_bad_arguments_raise_an_argument_error_naming_the_argument(name, kwargs, argument):
    with pytest.raises(ArgumentError) as info:
        LOSSES.get(name)(**kwargs)
    assert info.value.argument == argument
    message = str(info.value)
    assert "\n" not in message and argument in message


# --------------------------------------------------------------------------------------
# In a config
# --------------------------------------------------------------------------------------

SIGLIP_EDGES = """\
  si_st:
    loss: siglip
    inputs: [student.image, student.text]
  si_tt:
    loss: siglip
    inputs: [student.image, teacher.text]
    args: {learnable: false}
  kd:
    loss: sigmoid_kd
    inputs: [student.image, student.text, teacher.image, teacher.text]
    args: {teacher_scale: 12.0, teacher_bias: -9.0}
"""


def siglip_yaml(folder, data_root, edges: str = SIGLIP_EDGES):
    from tests.conftest import TINY

    text = TINY.format(out=folder / "run", data=data_root)
    head, rest = text.split("edges:\n", 1)
    _, tail = rest.split("data:\n", 1)
    path = folder / "siglip.yaml"
    path.write_text(head + "edges:\n" + edges + "data:\n" + tail)
    return path


def test_a_graph_with_siglip_edges_validates_and_computes_a_finite_loss(tmp_path, data_root):
    from distill.core.build import build_graph
    from distill.core.check import load_checked

    graph = build_graph(load_checked(siglip_yaml(tmp_path, data_root), data=False))
    assert graph.losses["si_tt"].proj.weight.shape == (24, 16)  # student 16 -> teacher 24
    n = 6
    inputs = {}
    for name, model in graph.models.items():
        text = model.text_preprocess()([f"a red circle number {i}" for i in range(n)])
        inputs[name] = {"pixel_values": torch.randn(n, 3, 32, 32), **text}
    batch = Batch(keys=[str(i) for i in range(n)], image_ids=torch.tensor([0, 0, 1, 2, 3, 4]), inputs=inputs)
    out = graph(batch)
    assert set(out) == {"loss", "edge/si_st", "edge/si_tt", "edge/kd"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert graph.losses["si_st"].logit_scale.grad is not None
    assert graph.losses["si_st"].logit_bias.grad is not None


def test_a_bad_siglip_argument_is_reported_at_its_yaml_path(tmp_path, data_root):
    from distill.core.check import load_checked
    from distill.errors import ConfigError

    edges = "  si_st:\n    loss: siglip\n    inputs: [student.image, student.text]\n    args: {scale: -1.0}\n"
    with pytest.raises(ConfigError) as info:
        load_checked(siglip_yaml(tmp_path, data_root, edges), data=False)
    assert any(p.startswith("edges.si_st.args.scale: scale must be") for p in info.value.problems), info.value.problems


# --------------------------------------------------------------------------------------
# DDP: two gloo processes with half batches equal one process with the whole batch
# --------------------------------------------------------------------------------------

DDP_IDS = [0, 1, 2, 2, 3, 4, 4, 5]  # image 2's two captions sit on different ranks


def ddp_graph() -> KnowledgeGraph:
    edges = [
        Edge("task", LOSSES.get("siglip")(scale=5.0, bias=-3.0), ["student.image", "student.text"]),
        Edge("kd", LOSSES.get("sigmoid_kd")(learnable=True, student_scale=6.0, student_bias=-4.0),
             ["student.image", "student.text", "teacher.image", "teacher.text"], 0.5),
    ]
    models = {"student": LinearDual(8, seed=1), "teacher": LinearDual(8, seed=2)}
    return KnowledgeGraph(models, edges, frozen=["teacher"])


def ddp_batch(start: int = 0, stop: int = sum(ROWS)) -> Batch:
    g = torch.Generator().manual_seed(0)
    n = sum(ROWS)
    inputs = {"pixel_values": torch.randn(n, D_IN, generator=g), "input_ids": torch.randint(0, VOCAB, (n, 6), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs = {k: v[start:stop] for k, v in inputs.items()}
    keys = [str(i) for i in range(start, stop)]
    return Batch(keys=keys, image_ids=torch.tensor(DDP_IDS[start:stop]), inputs={"student": inputs, "teacher": inputs})


def grads(graph: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in graph.named_parameters() if p.grad is not None}


def ddp_worker(rank: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        graph = ddp_graph()
        ddp = nn.parallel.DistributedDataParallel(graph)
        start = sum(ROWS[:rank])
        out = ddp(ddp_batch(start, start + ROWS[rank]))
        out["loss"].backward()
        values = {k: float(v.detach()) for k, v in out.items()}
        queue.put((rank, values, {k: v.numpy() for k, v in grads(graph).items()}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_loss_and_gradients_match_single_process():
    single = ddp_graph()
    out = single(ddp_batch())
    out["loss"].backward()
    expected = grads(single)
    assert {"losses.task.logit_scale", "losses.task.logit_bias", "losses.kd.logit_scale",
            "losses.kd.logit_bias"} <= set(expected)

    results = spawn(ddp_worker, 2)
    for rank, values, got in results:
        for key in ("loss", "edge/task", "edge/kd"):  # every rank computes the global values
            assert math.isclose(values[key], float(out[key].detach()), rel_tol=1e-5, abs_tol=1e-6), (rank, key)
        assert set(got) == set(expected), rank
        for name, g in expected.items():
            torch.testing.assert_close(torch.from_numpy(got[name]), g, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
