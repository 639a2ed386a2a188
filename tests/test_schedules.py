"""Schedules of edge weights and fixed temperatures (`distill.core.schedule`): golden values
of each kind, the graph applying them, a tiny fit that logs them and resumes them, and one
line per bad schedule naming its YAML path."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from distill.commands.cli import main
from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.core.schedule import Schedule, cosine, linear, piecewise
from distill.errors import ConfigError
from distill.training.stages import train
from tests.conftest import TINY, write_yaml
from tests.test_graph import fake_batch

# --------------------------------------------------------------------------------------
# 1. Golden values, each formula written out here
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step,want", [(0, 1.0), (250, 0.775), (500, 0.55), (1000, 0.1), (1500, 0.1), (-3, 1.0)])
def test_linear(step: int, want: float) -> None:
    # 1 -> 0.1 over 1000 steps: 0.9 per 1000 steps down, held at 0.1 after
    assert math.isclose(linear(step, 1.0, 0.1, 1000), want, abs_tol=1e-12)
    assert math.isclose(Schedule.parse({"schedule": "linear", "start": 1.0, "end": 0.1, "steps": 1000}, "w")(step),
                        want, abs_tol=1e-12)


@pytest.mark.parametrize("step", [0, 1, 137, 250, 500, 750, 999, 1000, 2000])
def test_cosine(step: int) -> None:
    t = min(step, 1000) / 1000
    want = 0.1 + 0.9 * (math.cos(math.pi * t) + 1) / 2
    assert math.isclose(cosine(step, 1.0, 0.1, 1000), want, rel_tol=1e-12)
    sched = Schedule.parse({"schedule": "cosine", "start": 1.0, "end": 0.1, "steps": 1000}, "w")
    assert math.isclose(sched(step), want, rel_tol=1e-12)


def test_cosine_landmarks() -> None:
    # start, the midpoint (the mean of start and end), a quarter (start - (1 - cos 45deg)/2 * range), end
    assert cosine(0, 1.0, 0.1, 1000) == 1.0
    assert math.isclose(cosine(500, 1.0, 0.1, 1000), 0.55, rel_tol=1e-12)
    assert math.isclose(cosine(250, 1.0, 0.1, 1000), 1.0 - 0.9 * (1 - math.sqrt(0.5)) / 2, rel_tol=1e-12)
    assert math.isclose(cosine(1000, 1.0, 0.1, 1000), 0.1, rel_tol=1e-12)
    assert math.isclose(cosine(500, 0.05, 0.1, 1000), 0.075, rel_tol=1e-12)  # increasing works too


@pytest.mark.parametrize("step,want", [(0, 1.0), (299, 1.0), (300, 0.5), (599, 0.5), (600, 0.1), (10**6, 0.1)])
def test_step(step: int, want: float) -> None:
    assert piecewise(step, [1.0, 0.5, 0.1], [300, 600]) == want
    sched = Schedule.parse({"schedule": "step", "values": [1.0, 0.5, 0.1], "boundaries": [300, 600]}, "w")
    assert sched(step) == want
    assert sched.extremes() == (0.1, 1.0)


def test_offset_delays_every_kind_and_constants() -> None:
    lin = Schedule.parse({"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 100, "offset": 50}, "w")
    assert [lin(s) for s in (0, 50, 100, 150, 400)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cos = Schedule.parse({"schedule": "cosine", "start": 1.0, "end": 0.0, "steps": 10, "offset": 5}, "w")
    assert cos(5) == 1.0 and math.isclose(cos(10), 0.5, abs_tol=1e-12) and cos(15) == 0.0
    stp = Schedule.parse({"schedule": "step", "values": [2.0, 1.0], "boundaries": [10], "offset": 5}, "w")
    assert (stp(14), stp(15)) == (2.0, 1.0)
    assert Schedule.parse(0.3, "w")(12345) == 0.3
    assert Schedule.parse({"schedule": "constant", "value": 2}, "w")(7) == 2.0
    assert lin.describe() == "linear(0 -> 1, 100 steps from step 50)"


# --------------------------------------------------------------------------------------
# 2. The graph applies them at its step
# --------------------------------------------------------------------------------------

SCHEDULED = """
extends: tiny.yaml
edges:
  si_tt:
    weight: {schedule: cosine, start: 1.0, end: 0.2, steps: 4}
    args: {temperature: {schedule: step, values: [0.1, 0.05], boundaries: [3]}}
  st_ti_kl:
    args:
      student_temperature: {schedule: linear, start: 0.1, end: 0.05, steps: 5}
      teacher_temperature: 0.07
"""


def weight_at(step: int) -> float:
    return 0.2 + 0.8 * (1 + math.cos(math.pi * min(step, 4) / 4)) / 2


def temperature_at(step: int) -> float:
    return 0.1 if step < 3 else 0.05


def student_temperature_at(step: int) -> float:
    return 0.1 - 0.05 * min(step, 5) / 5


@pytest.fixture
def scheduled_yaml(tiny_yaml: Path) -> Path:
    return write_yaml(tiny_yaml.parent, "scheduled.yaml", SCHEDULED)


def test_graph_sets_weights_and_temperatures_at_its_step(scheduled_yaml: Path) -> None:
    graph = build_graph(load_checked(scheduled_yaml))
    assert graph.edges["si_tt"].weight == 1.0 and graph.losses["st_ti_kl"].tau_s == 0.1  # step 0 on build
    batch = fake_batch(graph)
    for step in (0, 2, 3, 7):
        values = graph.set_step(step)
        assert values == pytest.approx({"weight/si_tt": weight_at(step), "temperature/si_tt": temperature_at(step),
                                        "student_temperature/st_ti_kl": student_temperature_at(step)})
        assert graph.edges["si_tt"].weight == pytest.approx(weight_at(step))
        assert math.isclose(graph.losses["si_tt"].logit_scale.item(), math.log(1 / temperature_at(step)), rel_tol=1e-6)
        assert graph.losses["st_ti_kl"].tau_s == pytest.approx(student_temperature_at(step))
        assert graph.losses["st_ti_kl"].tau_t == 0.07  # a plain number stays
        out = graph(batch)
        want = out["edge/si_st"] + weight_at(step) * out["edge/si_tt"] + out["edge/st_ti_kl"]
        torch.testing.assert_close(out["loss"].detach(), want)
    graph.set_enabled({"si_tt": False})
    assert set(graph.set_step(1)) == {"student_temperature/st_ti_kl"}  # only enabled edges report


def test_validate_shows_the_schedule(scheduled_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(scheduled_yaml)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("si_tt"))
    assert "w=cosine(1 -> 0.2, 4 steps)" in line


# --------------------------------------------------------------------------------------
# 3. A tiny fit logs them per step, and a resumed run continues them
# --------------------------------------------------------------------------------------


def rows(csv_file: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(csv_file)))


def test_fit_logs_scheduled_values_and_resume_continues_them(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY.format(out=tmp_path / "run", data=data_root))
    path = write_yaml(tmp_path, "scheduled.yaml", SCHEDULED)
    out = tmp_path / "run"
    train(load_checked(path, ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"]))
    train(load_checked(path, ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2", "resume=last"]))
    logged: dict[int, dict[str, str]] = {}
    for version in ("version_0", "version_1"):
        for r in rows(out / "logs" / version / "metrics.csv"):
            if r.get("train/weight/si_tt"):
                logged[int(r["step"])] = r
    assert sorted(logged) == list(range(6)), sorted(logged)  # steps 4 and 5 come from the resumed run
    for step, r in logged.items():
        assert math.isclose(float(r["train/weight/si_tt"]), weight_at(step), rel_tol=1e-6), (step, r)
        assert math.isclose(float(r["train/temperature/si_tt"]), temperature_at(step), rel_tol=1e-6)
        assert math.isclose(float(r["train/student_temperature/st_ti_kl"]), student_temperature_at(step), rel_tol=1e-6)
        total = float(r["train/edge/si_st"]) + weight_at(step) * float(r["train/edge/si_tt"]) + float(r["train/edge/st_ti_kl"])
        assert math.isclose(float(r["train/loss"]), total, rel_tol=1e-5), (step, r)
    assert len({r["train/weight/si_tt"] for r in logged.values()}) == 5  # it changes (steps 4 and 5: the end)
    assert "train/temperature/si_st" in logged[0]  # the learnable one keeps its name: 1/logit scale


# --------------------------------------------------------------------------------------
# 4. Bad schedules: one line, at the YAML path
# --------------------------------------------------------------------------------------

W = "edges.si_tt.weight"
T = "edges.si_tt.args.temperature"


@pytest.mark.parametrize("override,expected", [
    (f"{W}={{schedule: cosin, start: 1.0, end: 0.1, steps: 1000}}",
     f"{W}.schedule: unknown schedule 'cosin' (constant, linear, cosine, step); did you mean 'cosine'?"),
    (f"{W}={{start: 1.0, end: 0.1, steps: 10}}", f"{W}.schedule: missing; one of constant, linear, cosine, step"),
    (f"{W}={{schedule: linear, start: 1.0, end: 0.1}}", f"{W}.steps: missing; a linear schedule takes start, end, steps, offset"),
    (f"{W}={{schedule: linear, start: 1.0, end: 0.1, stpes: 10}}", f"{W}.stpes: unknown key; did you mean 'steps'?"),
    (f"{W}={{schedule: linear, start: 1.0, end: 0.1, steps: 0}}", f"{W}.steps: must be an integer >= 1, got 0"),
    (f"{W}={{schedule: cosine, start: 1.0, end: -1, steps: 10}}",
     f"{W}.end: must be >= 0 (a negative weight maximises the loss), got -1"),
    (f"{W}={{schedule: linear, start: .nan, end: 0.1, steps: 10}}", f"{W}.start: must be a finite number, got nan"),
    (f"{W}={{schedule: linear, start: 1, end: 0, steps: 10, offset: -2}}", f"{W}.offset: must be an integer >= 0, got -2"),
    (f"{W}={{schedule: step, values: [1.0, 0.5], boundaries: [300, 600]}}",
     f"{W}.values: a step schedule takes one value more than boundaries"),
    (f"{W}={{schedule: step, values: [1.0, 0.5, 0.1], boundaries: [600, 300]}}", f"{W}.boundaries: must increase strictly"),
    (f"{W}={{schedule: step, values: [1.0, -0.5], boundaries: [3]}}", f"{W}.values[1]: must be >= 0"),
    (f"{W}={{schedule: constant}}", f"{W}.value: missing; a constant schedule takes value, offset"),
    (f"{W}=heavy", f"{W}: must be a number or a schedule mapping"),
    (f"{W}=-0.5", f"{W}: must be >= 0 (a negative weight maximises the loss), got -0.5"),
    (f"{T}={{schedule: linear, start: 0.1, end: 0.0, steps: 10}}",
     f"{T}: temperature must be a finite number > 0, got 0.0 (a value its schedule takes)"),
    (f"{T}={{schedule: linear, start: 0.1, end: 0.001, steps: 10}}", f"{T}: temperature 0.001 is below 1/max_logit_scale"),
    (f"{T}={{schedule: cosin, start: 0.1, end: 0.05, steps: 10}}", f"{T}.schedule: unknown schedule 'cosin'"),
    (f"{T}={{start: 0.1, end: 0.05, steps: 10}}", f"{T}.schedule: missing; one of constant, linear, cosine, step"),
    ("edges.si_st.args.temperature={schedule: linear, start: 0.1, end: 0.05, steps: 10}",
     "edges.si_st.args.temperature: a learnable temperature cannot be scheduled (learnable: true)"),
    ("edges.st_ti_kl.args.columns={schedule: constant, value: 1}",
     "edges.st_ti_kl.args.columns: cannot be scheduled; the arguments of this loss that can: "
     "student_temperature, teacher_temperature"),
])
def test_bad_schedules_are_one_line_at_their_path(tiny_yaml: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_checked(tiny_yaml, [override])
    problems = info.value.problems
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_the_cli_reports_a_bad_schedule_before_loading(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tiny_yaml), f"{W}={{schedule: cosin, start: 1, end: 0.1, steps: 9}}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {W}.schedule: unknown schedule 'cosin' (constant, linear, cosine, step)" in err
