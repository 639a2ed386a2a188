"""The N-teacher ensemble edge (`similarity_kl_ensemble`): golden values against a plain-Python
reference for 3 teachers, weight normalisation, columns and `exclude_self`; inputs and
arguments checked against the edge's teacher count; a 3-teacher graph end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.losses.base import ArgumentError, EdgeContext
from distill.registry import LOSSES
from tests.conftest import write_yaml
from tests.test_graph import fake_batch

ENSEMBLE = LOSSES.get("similarity_kl_ensemble")


def reference(student, teachers, taus, weights, tau_s, ids, columns, exclude_self):  # noqa: ANN001, ANN201
    """KL(sum_k w_k softmax(S_k / tau_k) || softmax(S_s / tau_s)) with loops, math.exp and math.log.

    `student` and each of `teachers` are pairs (x, y) of row lists; weights are normalised
    here; with `exclude_self`, entries (i, j) with ids[i] == ids[j] are left out of every
    softmax (their probability is 0); with `columns`, the same on the transposed matrices,
    averaged with the rows."""
    n = len(ids)
    total_w = sum(weights)
    w = [v / total_w for v in weights]

    def sims(x, y, tau, transpose):  # noqa: ANN001, ANN202
        m = [[sum(p * q for p, q in zip(x[i], y[j])) / tau for j in range(n)] for i in range(n)]
        return [[m[j][i] for j in range(n)] for i in range(n)] if transpose else m

    def softmax_row(row, i):  # noqa: ANN001, ANN202
        keep = [j for j in range(n) if not (exclude_self and ids[i] == ids[j])]
        top = max(row[j] for j in keep)
        z = sum(math.exp(row[j] - top) for j in keep)
        return [math.exp(row[j] - top) / z if j in keep else 0.0 for j in range(n)]

    def direction(transpose):  # noqa: ANN001, ANN202
        s = sims(*student, tau_s, transpose)
        ts = [sims(x, y, tau, transpose) for (x, y), tau in zip(teachers, taus)]
        loss = 0.0
        for i in range(n):
            q = softmax_row(s[i], i)
            probs = [softmax_row(t[i], i) for t in ts]
            p = [sum(w[k] * probs[k][j] for k in range(len(ts))) for j in range(n)]
            loss += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(n) if p[j] > 0)
        return loss / n

    rows = direction(False)
    return 0.5 * (rows + direction(True)) if columns else rows


def unit(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def lists(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


IDS = [0, 1, 1, 2, 3, 4]  # rows 1 and 2: two captions of one image
TAUS = [0.05, 0.1, 0.2]
WEIGHTS = [2.0, 1.0, 1.0]  # normalised: 0.5, 0.25, 0.25


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("columns", [False, True])
def test_three_teachers_match_the_plain_python_reference(columns: bool, exclude_self: bool) -> None:
    g = torch.Generator().manual_seed(21)
    a1, a2 = unit(g, 6, 4), unit(g, 6, 4)
    teachers = [(unit(g, 6, 8), unit(g, 6, 8)), (unit(g, 6, 3), unit(g, 6, 3)), (unit(g, 6, 5), unit(g, 6, 5))]
    loss = ENSEMBLE(student_temperature=0.07, teacher_temperatures=TAUS, teacher_weights=WEIGHTS,
                    columns=columns, exclude_self=exclude_self)
    slots = ENSEMBLE.slots(8)
    assert slots is not None
    loss.bind(slots)
    dims = {"student_a": 4, "student_b": 4, "teacher1_a": 8, "teacher1_b": 8, "teacher2_a": 3, "teacher2_b": 3,
            "teacher3_a": 5, "teacher3_b": 5}
    assert loss.dim_problem(dims) is None
    flat = [t for pair in teachers for t in pair]
    got = loss(a1, a2, *flat, ctx=EdgeContext(image_ids=torch.tensor(IDS))).item()
    want = reference((lists(a1), lists(a2)), [(lists(x), lists(y)) for x, y in teachers], TAUS, WEIGHTS, 0.07,
                     IDS, columns, exclude_self)
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (got, want)


def test_weights_are_normalised_and_scale_free() -> None:
    g = torch.Generator().manual_seed(22)
    xs = [unit(g, 5, 4) for _ in range(8)]
    ctx = EdgeContext(image_ids=torch.arange(5))

    def value(weights: list[float] | None) -> float:
        loss = ENSEMBLE(teacher_temperatures=TAUS, teacher_weights=weights)
        loss.bind(ENSEMBLE.slots(8))  # type: ignore[arg-type]
        return loss(*xs, ctx=ctx).item()

    assert math.isclose(value([2.0, 1.0, 1.0]), value([0.5, 0.25, 0.25]), rel_tol=1e-6)
    assert math.isclose(value([2.0, 1.0, 1.0]), value([20.0, 10.0, 10.0]), rel_tol=1e-6)
    assert math.isclose(value(None), value([1.0, 1.0, 1.0]), rel_tol=1e-6)  # default: equal weights
    assert not math.isclose(value([1.0, 0.0, 0.0]), value([0.0, 0.0, 1.0]), rel_tol=1e-3)
    want = reference((lists(xs[0]), lists(xs[1])), [(lists(xs[2 * k + 2]), lists(xs[2 * k + 3])) for k in range(3)],
                     TAUS, [0.0, 3.0, 1.0], 0.05, list(range(5)), True, False)
    assert math.isclose(value([0.0, 3.0, 1.0]), want, rel_tol=1e-5)  # a zero weight drops that teacher


def test_defaults_follow_the_number_of_teachers_in_the_inputs() -> None:
    loss = ENSEMBLE()
    assert loss.each(loss.tau_t) == [0.05, 0.05] and loss.inputs == ENSEMBLE.inputs  # two teachers unless bound
    loss.bind(ENSEMBLE.slots(10))  # type: ignore[arg-type]
    assert loss.each(loss.tau_t) == [0.05] * 4 and loss.weights == [0.25] * 4
    assert loss.inputs[-2:] == ("teacher4_a", "teacher4_b")
    assert ENSEMBLE.slots(4) is None and ENSEMBLE.slots(7) is None and ENSEMBLE.slots(6) == ENSEMBLE.inputs


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("columns", [False, True])
def test_one_teacher_three_times_is_similarity_kl(columns: bool, exclude_self: bool) -> None:
    g = torch.Generator().manual_seed(23)
    a, b, t = unit(g, 6, 4), unit(g, 6, 4), unit(g, 6, 7)
    ctx = EdgeContext(image_ids=torch.tensor(IDS))
    kw = {"columns": columns, "exclude_self": exclude_self}
    ens = ENSEMBLE(student_temperature=0.1, teacher_temperatures=[0.07] * 3, teacher_weights=[5.0, 1.0, 0.5], **kw)
    ens.bind(ENSEMBLE.slots(8))  # type: ignore[arg-type]
    single = LOSSES.get("similarity_kl")(student_temperature=0.1, teacher_temperature=0.07, **kw)
    torch.testing.assert_close(ens(a, b, t, t, t, t, t, t, ctx=ctx), single(a, b, t, t, ctx=ctx))


@pytest.mark.parametrize("kwargs,argument,message", [
    ({"teacher_temperatures": [0.05]}, "teacher_temperatures", "takes one value per teacher and an ensemble has at least 2"),
    ({"teacher_weights": [1.0, 1.0, 1.0], "teacher_temperatures": [0.1, 0.1]}, "teacher_weights", "got 3 for 2"),
    ({"teacher_weights": [1.0, -1.0]}, "teacher_weights[1]", "must be a finite number >= 0, got -1.0"),
    ({"teacher_weights": [0.0, 0.0, 0.0]}, "teacher_weights", "must not all be 0"),
    ({"teacher_temperatures": [0.1, 0.0]}, "teacher_temperatures[1]", "must be a finite number > 0"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, argument: str, message: str) -> None:
    with pytest.raises(ArgumentError, match=message) as info:
        ENSEMBLE(**kwargs)
    assert info.value.argument == argument


# --------------------------------------------------------------------------------------
# The config check and the graph
# --------------------------------------------------------------------------------------

THREE = """
name: three_teachers
output_dir: {out}
models:
  student: {{type: tiny_dual, args: {{embed_dim: 16, image_size: 32}}}}
  t1: {{type: tiny_dual, frozen: true, args: {{embed_dim: 24, image_size: 32}}}}
  t2: {{type: tiny_dual, frozen: true, args: {{embed_dim: 12, image_size: 32}}}}
  t3: {{type: tiny_dual, frozen: true, args: {{embed_dim: 20, image_size: 32}}}}
edges:
  si_st: {{loss: infonce, inputs: [student.image, student.text]}}
  st_st_ens:
    loss: similarity_kl_ensemble
    inputs: [student.text, student.text, t1.text, t1.text, t2.text, t2.text, t3.text, t3.text]
    args:
      student_temperature: {{schedule: linear, start: 0.1, end: 0.05, steps: 4}}
      teacher_temperatures: [0.05, 0.1, 0.2]
      teacher_weights: [2.0, 1.0, 1.0]
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
  batch_size: 16
  num_workers: 0
"""
E = "edges.st_st_ens"


@pytest.fixture
def three_yaml(tmp_path: Path, data_root: Path) -> Path:
    return write_yaml(tmp_path, "three.yaml", THREE.format(out=tmp_path / "run", data=data_root))


def test_a_three_teacher_edge_trains_the_student_only(three_yaml: Path) -> None:
    graph = build_graph(load_checked(three_yaml))
    loss = graph.losses["st_st_ens"]
    assert loss.tau_t == [0.05, 0.1, 0.2] and loss.weights == [0.5, 0.25, 0.25]
    assert graph.set_step(2) == {"student_temperature/st_st_ens": pytest.approx(0.075)}
    batch = fake_batch(graph)
    out = graph(batch)
    nodes = {n: graph.encode(n, batch) for n in ("student.text", "t1.text", "t2.text", "t3.text")}
    ids = batch.image_ids.tolist()
    want = reference((lists(nodes["student.text"]),) * 2,
                     [(lists(nodes[f"t{k}.text"]),) * 2 for k in (1, 2, 3)], [0.05, 0.1, 0.2], [2.0, 1.0, 1.0],
                     0.075, ids, True, False)
    assert math.isclose(out["edge/st_st_ens"].item(), want, rel_tol=1e-4)
    out["loss"].backward()
    assert all(p.grad is None for m in ("t1", "t2", "t3") for p in graph.models[m].parameters())
    assert any(p.grad is not None for p in graph.models["student"].parameters())


@pytest.mark.parametrize("override,expected", [
    (f"{E}.inputs=[student.text, student.text, t1.text, t1.text, t2.text]",
     f"{E}.inputs: loss 'similarity_kl_ensemble' takes the student pair then 2 or more teacher pairs "
     "(student_a, student_b, teacher1_a, teacher1_b, teacher2_a, teacher2_b, ...), got 5"),
    (f"{E}.inputs=[student.text, student.text, t1.text, t1.text]", f"{E}.inputs: loss 'similarity_kl_ensemble' takes"),
    (f"{E}.args.teacher_weights=[1.0, 1.0]",
     f"{E}.args.teacher_weights: teacher_weights takes one value per teacher: got 2 for 3 teacher_temperatures"),
    (f"{E}.args.teacher_temperatures=[0.05, 0.1, 0.2, 0.3]", f"{E}.args.teacher_weights: teacher_weights takes one value"),
    ([f"{E}.args.teacher_temperatures=null", f"{E}.args.teacher_weights=[1.0, 1.0]"],
     f"{E}.args.teacher_weights: teacher_weights takes one value per teacher: the inputs list 3 teacher pairs, got 2"),
    (f"{E}.args.teacher_weights=[1.0, -1.0, 1.0]", f"{E}.args.teacher_weights[1]: teacher_weights[1] must be a finite number >= 0"),
    (f"{E}.args.teacher_weights=[0, 0, 0]", f"{E}.args.teacher_weights: teacher_weights must not all be 0"),
    (f"{E}.args.teacher_temperatures=[0.05, 0.1, -0.2]", f"{E}.args.teacher_temperatures[2]: teacher_temperatures[2] must be"),
    (f"{E}.args.teacher_temperatures={{schedule: linear, start: 0.1, end: 0.05, steps: 4}}",
     f"{E}.args.teacher_temperatures: cannot be scheduled; the arguments of this loss that can: student_temperature"),
    (f"{E}.inputs=[student.text, student.text, t1.text, t1.text, t2.text, t2.text, t3.text, t1.text]",
     f"{E}.inputs: inputs have different dimensions (teacher3_a=20, teacher3_b=24)"),
    (f"{E}.inputs=[student.text, student.text, t1.text, t1.text, t2.text, t2.text, t3.txt, t3.text]",
     f"{E}.inputs[6]: unknown node 't3.txt'; did you mean 't3.text'?"),
])
def test_bad_ensemble_configs_are_one_line_at_their_path(three_yaml: Path, override: str | list[str],
                                                        expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_checked(three_yaml, [override] if isinstance(override, str) else override)
    problems = info.value.problems
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)
