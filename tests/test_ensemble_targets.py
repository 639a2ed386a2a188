"""Every in-batch loss with a teacher target reads N teachers (`distill.losses.ensemble`):
golden values of 3 teachers with unequal weights and temperatures or scales against formulas
written out here with loops; one teacher repeated N times is the one-teacher loss; exact
accumulation; the YAML check's one-line errors for per-teacher lists of the wrong length.
Local mode on 2 and 3 gloo processes: the `*_3` cases of tests/test_local_loss.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.commands.cli import main
from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.losses.base import EdgeContext
from distill.losses.ensemble import mean_ensemble, sigmoid_ensemble, softmax_ensemble
from distill.registry import LOSSES
from distill.training.gradcache import accumulate
from tests.conftest import TINY_FUSION, shrink, write_yaml
from tests.test_ensemble import lists, reference, unit
from tests.test_fused_losses import table_scorer
from tests.test_graph import fake_batch
from tests.test_local_loss import LAYOUTS, full_batch, make_graph

IDS = [0, 1, 1, 2, 3, 4]  # rows 1 and 2: two captions of one image
WEIGHTS = [2.0, 1.0, 1.0]  # normalised: 0.5, 0.25, 0.25


def bound(name: str, n_inputs: int, **kwargs: object) -> torch.nn.Module:
    """The loss `name` bound to an edge of `n_inputs` input nodes, as the graph builds it."""
    loss = LOSSES.get(name)(**kwargs)
    loss.bind(type(loss).slots(n_inputs))
    return loss


def inputs(seed: int, widths: tuple[int, ...] = (4, 8, 3, 5), n: int = 6) -> list[torch.Tensor]:
    """The student pair (width widths[0]) and one pair per teacher (widths[1:])."""
    g = torch.Generator().manual_seed(seed)
    return [unit(g, n, d) for d in widths for _ in "ab"]


def dot(x: list[float], y: list[float]) -> float:
    return sum(p * q for p, q in zip(x, y))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def normalised(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


# --------------------------------------------------------------------------------------
# Golden values, 3 teachers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("columns", [False, True])
def test_similarity_kl_of_three_teachers_matches_the_loops(columns: bool, exclude_self: bool) -> None:
    xs = inputs(31)
    taus = [0.05, 0.1, 0.2]
    loss = bound("similarity_kl", 8, student_temperature=0.07, teacher_temperature=taus, teacher_weights=WEIGHTS,
                 columns=columns, exclude_self=exclude_self)
    got = loss(*xs, ctx=EdgeContext(image_ids=torch.tensor(IDS))).item()
    pairs = [(lists(xs[i]), lists(xs[i + 1])) for i in (2, 4, 6)]
    want = reference((lists(xs[0]), lists(xs[1])), pairs, taus, WEIGHTS, 0.07, IDS, columns, exclude_self)
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (got, want)
    # the alias of existing configs is the same loss
    alias = bound("similarity_kl_ensemble", 8, student_temperature=0.07, teacher_temperatures=taus,
                  teacher_weights=WEIGHTS, columns=columns, exclude_self=exclude_self)
    assert alias(*xs, ctx=EdgeContext(image_ids=torch.tensor(IDS))).item() == got


def test_similarity_mse_of_three_teachers_matches_the_loops() -> None:
    xs = inputs(32)
    got = bound("similarity_mse", 8, scale=2.0, teacher_weights=WEIGHTS)(*xs, ctx=EdgeContext(torch.tensor(IDS)))
    x = [lists(t) for t in xs]
    w, n = normalised(WEIGHTS), len(IDS)
    total = 0.0
    for i in range(n):
        for j in range(n):
            target = sum(w[k] * dot(x[2 + 2 * k][i], x[3 + 2 * k][j]) for k in range(3))
            total += (dot(x[0][i], x[1][j]) - target) ** 2
    assert math.isclose(got.item(), 2.0 * total / n**2, rel_tol=1e-5)


def test_sigmoid_kd_of_three_teachers_matches_the_loops() -> None:
    xs = inputs(33)
    scales, biases = [5.0, 10.0, 8.0], [-3.0, -10.0, -6.0]
    loss = bound("sigmoid_kd", 8, student_scale=7.0, student_bias=-4.0, teacher_scale=scales, teacher_bias=biases,
                 teacher_weights=WEIGHTS)
    got = loss(*xs, ctx=EdgeContext(torch.tensor(IDS))).item()
    x = [lists(t) for t in xs]
    w, n = normalised(WEIGHTS), len(IDS)
    total = 0.0
    for i in range(n):
        for j in range(n):
            q = sigmoid(7.0 * dot(x[0][i], x[1][j]) - 4.0)
            p = sum(w[k] * sigmoid(scales[k] * dot(x[2 + 2 * k][i], x[3 + 2 * k][j]) + biases[k]) for k in range(3))
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert math.isclose(got, total / n, rel_tol=1e-5)


def reference_fused_kl(x: list[list[list[float]]], fused: torch.Tensor, features: torch.Tensor, *, k: int, mix: str,
                       alpha: float, tau_s: float, taus: list[float], weights: list[float], tau_f: float,
                       columns: bool) -> float:
    """fused_kl with its dual side an ensemble of the teacher pairs x[2:]: loops over rows,
    candidates and teachers; `mix: feature` mixes f_i . f_j into each dual teacher."""
    n, w = len(IDS), normalised(weights)
    f = [[v / math.sqrt(dot(features[i, i].tolist(), features[i, i].tolist())) for v in features[i, i].tolist()]
         for i in range(n)]

    def direction(transpose: bool) -> float:
        def sim(a: list[list[float]], b: list[list[float]], i: int, j: int) -> float:
            return dot(a[j], b[i]) if transpose else dot(a[i], b[j])

        total = 0.0
        for i in range(n):
            student = softmax([sim(x[0], x[1], i, j) / tau_s for j in range(n)])
            dual = [0.0] * n
            for t in range(len(taus)):
                a, b = x[2 + 2 * t], x[3 + 2 * t]
                row = [sim(a, b, i, j) for j in range(n)]
                if mix == "feature":
                    row = [(1 - alpha) * row[j] + alpha * dot(f[i], f[j]) for j in range(n)]
                dual = [d + w[t] * p for d, p in zip(dual, softmax([v / taus[t] for v in row]))]
            if mix == "feature":
                target = dual
            else:
                score = [fused[j, i].item() if transpose else fused[i, j].item() for j in range(n)]
                others = sorted((j for j in range(n) if IDS[i] != IDS[j]), key=lambda j: -dual[j])[:k]
                cand = [j for j in range(n) if IDS[i] == IDS[j]] + others
                if mix == "prob":
                    fz = {j: math.exp(score[j] / tau_f) for j in cand}
                    target = [(1 - alpha) * dual[j] + alpha * fz.get(j, 0.0) / sum(fz.values()) for j in range(n)]
                else:
                    floor = min(score[j] for j in cand)
                    target = softmax([math.log(dual[j]) + (alpha * (score[j] - floor) if j in cand else 0.0)
                                      for j in range(n)])
            total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, student) if p > 0)
        return total / n

    rows = direction(False)
    return 0.5 * (rows + direction(True)) if columns else rows


@pytest.mark.parametrize("mix,alpha,columns", [("prob", 0.5, True), ("prob", 0.3, False), ("logit", 0.7, True),
                                               ("feature", 0.4, True)])
def test_fused_kl_with_three_dual_teachers_matches_the_loops(mix: str, alpha: float, columns: bool) -> None:
    xs = inputs(34)
    g = torch.Generator().manual_seed(35)
    fused, features = torch.randn(6, 6, generator=g) * 3, torch.randn(6, 6, 3, generator=g)
    taus = [0.07, 0.1, 0.05]
    args = dict(k=2, mix=mix, alpha=alpha, student_temperature=0.1, fused_temperature=0.5, columns=columns)
    loss = bound("fused_kl", 9, teacher_temperature=taus, teacher_weights=WEIGHTS, **args)
    assert loss.inputs == ("student_image", "student_text", "teacher1_image", "teacher1_text", "teacher2_image",
                           "teacher2_text", "teacher3_image", "teacher3_text", "pair")
    got = loss(*xs, table_scorer(fused, features), ctx=EdgeContext(torch.tensor(IDS))).item()
    want = reference_fused_kl([lists(t) for t in xs], fused, features, taus=taus, weights=WEIGHTS, tau_s=0.1,
                              **{a: v for a, v in args.items() if a not in ("student_temperature", "fused_temperature")},
                              tau_f=0.5)
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (got, want)


# --------------------------------------------------------------------------------------
# One teacher repeated; exact accumulation
# --------------------------------------------------------------------------------------

REPEATED = {  # loss -> (arguments of one teacher, the same for 3 copies of it)
    "similarity_kl": ({"teacher_temperature": 0.07, "exclude_self": True},
                      {"teacher_temperature": [0.07] * 3, "exclude_self": True, "teacher_weights": [5.0, 1.0, 0.5]}),
    "similarity_mse": ({"scale": 3.0}, {"scale": 3.0, "teacher_weights": [5.0, 1.0, 0.5]}),
    "sigmoid_kd": ({"teacher_scale": 6.0, "teacher_bias": -2.0},
                   {"teacher_scale": 6.0, "teacher_bias": [-2.0] * 3, "teacher_weights": [5.0, 1.0, 0.5]}),
    "fused_kl": ({"k": 2, "teacher_temperature": 0.07}, {"k": 2, "teacher_temperature": 0.07, "teacher_weights": [5.0, 1.0, 0.5]}),
    "fused_kl_logit": ({"k": 2, "mix": "logit"}, {"k": 2, "mix": "logit", "teacher_weights": [1.0, 1.0, 3.0]}),
    "fused_kl_feature": ({"mix": "feature", "alpha": 0.3}, {"mix": "feature", "alpha": 0.3}),
}


def test_one_teacher_passes_through_unchanged() -> None:
    """Why a one-teacher edge is bit-identical to the loss before ensembles: its target is the
    teacher's own tensor, with no logsumexp or weighting on the way."""
    t = torch.randn(4, 5)
    assert all(f([t], [1.0]) is t for f in (softmax_ensemble, sigmoid_ensemble, mean_ensemble))
    p = torch.randn(4, 5).softmax(-1)
    q = torch.randn(4, 5).sigmoid()
    torch.testing.assert_close(softmax_ensemble([p.log(), t], [0.25, 0.75]).exp(), 0.25 * p + 0.75 * t.softmax(-1))
    torch.testing.assert_close(sigmoid_ensemble([q.logit(), t], [0.25, 0.75]).sigmoid(), 0.25 * q + 0.75 * t.sigmoid())


@pytest.mark.parametrize("case", list(REPEATED))
def test_one_teacher_repeated_is_the_one_teacher_loss(case: str) -> None:
    name = case.removesuffix("_logit").removesuffix("_feature")
    one, three = REPEATED[case]
    s1, s2, t1, t2 = inputs(36, (4, 7))
    tail = [table_scorer(torch.randn(6, 6, generator=torch.Generator().manual_seed(37)),
                         torch.randn(6, 6, 3, generator=torch.Generator().manual_seed(38)))] if name == "fused_kl" else []
    ctx = EdgeContext(torch.tensor(IDS))
    single = bound(name, 4 + len(tail), **one)
    assert single.inputs == LOSSES.get(name).inputs  # one teacher: the slot names it always had
    ensemble = bound(name, 8 + len(tail), **three)
    torch.testing.assert_close(ensemble(s1, s2, t1, t2, t1, t2, t1, t2, *tail, ctx=ctx),
                               single(s1, s2, t1, t2, *tail, ctx=ctx))


@pytest.mark.parametrize("case", ["similarity_kl_3", "similarity_mse_3", "sigmoid_kd_3"])
def test_n_teacher_edges_accumulate_exactly(case: str) -> None:
    """4 micro-batches of 3 (GradCache) give the gradients of the batch of 12, the learnable
    student scale and bias of `sigmoid_kd` included."""
    batch = full_batch(LAYOUTS[3][1])
    graph = make_graph(case, local_loss=False).train()
    whole = graph(batch)
    whole["loss"].backward()
    expected = {n: p.grad.clone() for n, p in graph.named_parameters() if p.grad is not None}
    graph.zero_grad()
    out = accumulate(graph, batch, 4, lambda t: t.backward())
    torch.testing.assert_close(out["loss"], whole["loss"].detach())
    got = {n: p.grad for n, p in graph.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any(n.startswith("losses.") for n in got) == (case == "sigmoid_kd_3")
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------
# The config check and the graph
# --------------------------------------------------------------------------------------

GRAPH = """
name: n_teachers
output_dir: {out}
models:
  student: {{type: tiny_dual, args: {{embed_dim: 16, image_size: 32}}}}
  t1: {{type: tiny_dual, frozen: true, args: {{embed_dim: 24, image_size: 32}}}}
  t2: {{type: tiny_dual, frozen: true, args: {{embed_dim: 12, image_size: 32}}}}
  t3: {{type: tiny_dual, frozen: true, args: {{embed_dim: 20, image_size: 32}}}}
  fused: {{type: fusion, frozen: true, args: {fusion}}}
edges:
  si_st: {{loss: infonce, inputs: [student.image, student.text]}}
  si_si_sd:
    loss: similarity_mse
    inputs: [student.image, student.image, t1.image, t1.image, t2.image, t2.image, t3.image, t3.image]
    args: {{teacher_weights: [2.0, 1.0, 1.0]}}
  si_st_kd:
    loss: sigmoid_kd
    inputs: [student.image, student.text, t1.image, t1.text, t2.image, t2.text, t3.image, t3.text]
    args: {{teacher_scale: [5.0, 10.0, 8.0], teacher_bias: [-3.0, -10.0, -6.0], teacher_weights: [1.0, 2.0, 1.0]}}
  st_st_kl:
    loss: similarity_kl
    inputs: [student.text, student.text, t1.text, t1.text, t2.text, t2.text, t3.text, t3.text]
    args:
      teacher_temperature: {{schedule: linear, start: 0.1, end: 0.05, steps: 4}}   # every teacher's
      teacher_weights: [2.0, 1.0, 1.0]
  mcad_kl:
    loss: fused_kl
    inputs: [student.image, student.text, t1.image, t1.text, t2.image, t2.text, fused.pair]
    args: {{k: 2, teacher_temperature: [0.05, 0.1], teacher_weights: [3.0, 1.0]}}
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
  batch_size: 16
  num_workers: 0
"""


@pytest.fixture
def graph_yaml(tmp_path: Path, data_root: Path) -> Path:
    fusion = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_FUSION.items()) + "}"
    return write_yaml(tmp_path, "n.yaml", GRAPH.format(out=tmp_path / "run", data=data_root, fusion=fusion))


def test_n_teacher_edges_build_and_compute_their_formulas(graph_yaml: Path) -> None:
    graph = build_graph(load_checked(graph_yaml))
    kl = graph.losses["st_st_kl"]
    assert graph.set_step(2)["teacher_temperature/st_st_kl"] == pytest.approx(0.075)
    assert kl.each(kl.tau_t) == [pytest.approx(0.075)] * 3 and kl.weights == [0.5, 0.25, 0.25]
    assert graph.losses["si_st_kd"].each(graph.losses["si_st_kd"].teacher_bias) == [-3.0, -10.0, -6.0]
    assert graph.losses["mcad_kl"].inputs[-3:] == ("teacher2_image", "teacher2_text", "pair")
    batch = fake_batch(graph)
    out = graph(batch)
    text = [lists(graph.encode(f"{m}.text", batch)) for m in ("student", "t1", "t2", "t3")]
    want = reference((text[0], text[0]), [(t, t) for t in text[1:]], [0.075] * 3, [2.0, 1.0, 1.0], 0.05,
                     batch.image_ids.tolist(), True, False)
    assert math.isclose(out["edge/st_st_kl"].item(), want, rel_tol=1e-4)
    assert all(math.isfinite(out[f"edge/{e}"].item()) for e in ("si_si_sd", "si_st_kd", "mcad_kl"))
    out["loss"].backward()
    assert all(p.grad is None for m in ("t1", "t2", "t3", "fused") for p in graph.models[m].parameters())


@pytest.mark.parametrize("override,expected", [
    ("edges.si_si_sd.args.teacher_weights=[1.0, 1.0]",
     "edges.si_si_sd.args.teacher_weights: teacher_weights takes one value per teacher: the inputs list 3 teacher "
     "pairs, got 2 values"),
    ("edges.si_st_kd.args.teacher_bias=[-3.0, -10.0]",
     "edges.si_st_kd.args.teacher_bias: teacher_bias takes one value per teacher: got 2 for 3 teacher_scale"),
    ("edges.si_st_kd.args.teacher_weights=[1.0, 1.0, 1.0, 1.0]",
     "edges.si_st_kd.args.teacher_weights: teacher_weights takes one value per teacher: got 4 for 3 teacher_scale"),
    ("edges.si_st_kd.args.teacher_scale=[5.0, 0.0, 8.0]",
     "edges.si_st_kd.args.teacher_scale[1]: teacher_scale[1] must be a finite number > 0, got 0.0"),
    ("edges.st_st_kl.args.teacher_temperature=[0.05, 0.1]",
     "edges.st_st_kl.args.teacher_weights: teacher_weights takes one value per teacher: got 3 for 2 teacher_temperature"),
    (["edges.st_st_kl.args.teacher_temperature=[0.05, 0.1]", "edges.st_st_kl.args.teacher_weights=null"],
     "edges.st_st_kl.args.teacher_temperature: teacher_temperature takes one value per teacher: the inputs list 3 "
     "teacher pairs, got 2 values"),
    ("edges.st_st_kl.args.teacher_temperature=[]",
     "edges.st_st_kl.args.teacher_temperature: teacher_temperature takes one value per teacher, got an empty list"),
    ("edges.st_st_kl.args.teacher_weights=[1.0, -1.0, 1.0]",
     "edges.st_st_kl.args.teacher_weights[1]: teacher_weights[1] must be a finite number >= 0, got -1.0"),
    ("edges.mcad_kl.args.teacher_temperature=[0.05, 0.1, 0.2]",
     "edges.mcad_kl.args.teacher_weights: teacher_weights takes one value per teacher: got 2 for 3 teacher_temperature"),
    ("edges.si_si_sd.inputs=[student.image, student.image, t1.image, t1.image, t2.image]",
     "edges.si_si_sd.inputs: loss 'similarity_mse' takes the student pair then 1 or more teacher pairs (student_a, "
     "student_b, teacher_a, teacher_b; N teachers: teacher1_a, teacher1_b, ..., teacher<N>_b), got 5"),
    ("edges.si_si_sd.inputs=[student.image, student.image, t1.image, t1.image, t2.image, t2.image, t3.image, t1.image]",
     "edges.si_si_sd.inputs: inputs have different dimensions (teacher3_a=20, teacher3_b=24)"),
    (["edges.si_si_sd.inputs=[student.image, student.image, t1.image, t1.image]"],
     "edges.si_si_sd.args.teacher_weights: teacher_weights takes one value per teacher: the inputs list 1 teacher "
     "pair, got 3 values"),
    ("edges.mcad_kl.inputs=[student.image, student.text, t1.image, t1.text, t2.image, fused.pair, fused.pair]",
     "edges.mcad_kl.inputs[5]: slot 'teacher2_text' of loss 'fused_kl' takes an embedding node, not a pair scorer"),
])
def test_bad_per_teacher_lists_are_one_line_at_their_path(graph_yaml: Path, override: str | list[str],
                                                         expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_checked(graph_yaml, [override] if isinstance(override, str) else override)
    problems = info.value.problems
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_the_ensemble_experiment_validates_with_its_n_teacher_mse_edge(
    data_root: Path, tiny_towers: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    exp = Path(__file__).parent.parent / "experiments" / "multi_teacher_ensemble.yaml"
    assert main(["validate", str(exp), *shrink(exp, data_root, tmp_path, tiny_towers)]) == 0
    out = capsys.readouterr().out
    assert "si_si_sd       similarity_mse" in out and "st_st_ens      similarity_kl_ensemble" in out
    graph = build_graph(load_checked(exp, shrink(exp, data_root, tmp_path, tiny_towers)))
    assert graph.losses["si_si_sd"].inputs[2:] == ("teacher1_a", "teacher1_b", "teacher2_a", "teacher2_b")
