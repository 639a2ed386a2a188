"""Config loading: schema, extends, overrides, and one clear line per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.core.check import load_checked
from distill.errors import ConfigError
from tests.conftest import write_yaml


def errors(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_checked(path, list(overrides))
    return info.value.problems


def test_tiny_config_loads_typed(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml)
    assert cfg.edges["si_st"].args["learnable"] is True
    assert cfg.edges["si_tt"].weight == 1.0 and cfg.models["teacher"].frozen
    assert cfg.data.batch_size == 16


def test_overrides_are_typed_and_toggle_edges(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml, ["edges.si_tt.enabled=false", "edges.si_st.weight=0.5", "data.batch_size=8"])
    assert cfg.edges["si_tt"].enabled is False
    assert cfg.edges["si_st"].weight == 0.5 and cfg.data.batch_size == 8


def test_extends_states_only_the_difference(tiny_yaml: Path, tmp_path: Path) -> None:
    child = write_yaml(tmp_path, "ablation.yaml", f"""
        extends: {tiny_yaml.name}
        name: ablation
        edges:
          st_ti_kl: {{enabled: false}}
          si_tt: null
    """)
    cfg = load_checked(child)
    assert cfg.name == "ablation" and cfg.edges["st_ti_kl"].enabled is False
    assert "si_tt" not in cfg.edges
    assert cfg.edges["st_ti_kl"].loss == "similarity_kl"  # inherited


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["edges.si_st.wieght=2"], "edges.si_st.wieght: unknown key"),
        (["edges.si_st.weight=heavy"], "edges.si_st.weight:"),
        (["edges.si_st.loss=infonse"], "edges.si_st.loss: unknown loss 'infonse'; did you mean 'infonce'?"),
        (["models.student.type=tiny_duel"], "models.student.type: unknown model 'tiny_duel'; did you mean 'tiny_dual'?"),
        (["edges.si_st.inputs=[student.imag,student.text]"], "edges.si_st.inputs[0]: unknown node 'student.imag'; did you mean 'student.image'?"),
        (["edges.si_st.args.temprature=0.2"], "edges.si_st.args.temprature: loss 'infonce' takes no argument 'temprature'; did you mean 'temperature'?"),
        (["edges.si_st.args.temperature=cold"], "edges.si_st.args.temperature: expected float, got 'cold'"),
        (["edges.si_st.inputs=[student.image]"], "edges.si_st.inputs: loss 'infonce' takes 2 inputs (a, b), got 1"),
        (["edges.si_st.inputs=[teacher.image,teacher.text]"], "edges.si_st: no trainable endpoint"),
        (["models.teacher.args.embed_dimm=3"], "models.teacher.args.embed_dimm: model 'tiny_dual' takes no argument"),
        (["data.dataset=synthetik"], "data.dataset: unknown dataset 'synthetik'; did you mean 'synthetic'?"),
        (["eval.model=teachr"], "eval.model: unknown model 'teachr'"),
        (["plugins=[no_such_module_xyz]"], "plugins[0]: cannot import 'no_such_module_xyz'"),
        (["trainer.local_loss=maybe"], "trainer.local_loss: Value 'maybe' is not a valid bool"),
    ],
)
def test_each_bad_input_is_one_line_with_its_path(tiny_yaml: Path, overrides: list[str], expected: str) -> None:
    problems = errors(tiny_yaml, *overrides)
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_dimension_mismatch_without_projection(tiny_yaml: Path) -> None:
    # S(student.text, teacher.text) would compare 16-wide with 24-wide rows
    problems = errors(tiny_yaml, "edges.st_ti_kl.inputs=[student.text,teacher.text,teacher.text,teacher.image]")
    assert any(p.startswith("edges.st_ti_kl.inputs: inputs have different dimensions") for p in problems), problems


def test_projectable_loss_accepts_different_widths(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml)  # si_tt: student 16 vs teacher 24 under infonce
    assert cfg.edges["si_tt"].inputs == ["student.image", "teacher.text"]


def test_no_enabled_edge(tiny_yaml: Path) -> None:
    problems = errors(tiny_yaml, "edges.si_st.enabled=false", "edges.si_tt.enabled=false", "edges.st_ti_kl.enabled=false")
    assert any(p.startswith("edges: no enabled edge") for p in problems)


def test_all_problems_reported_together(tiny_yaml: Path) -> None:
    problems = errors(
        tiny_yaml, "edges.si_st.loss=infonse", "edges.si_tt.args.margin=1", "models.student.type=nope", "data.batch_size=big"
    )
    # schema errors (wrong type) and semantic ones (registry, signature) come out together
    assert {p.split(":")[0] for p in problems} == {
        "data.batch_size", "edges.si_st.loss", "edges.si_tt.args.margin", "models.student.type"
    }, problems


def test_several_schema_errors_at_once(tiny_yaml: Path) -> None:
    problems = errors(tiny_yaml, "data.batch_size=big", "trainer.max_stepz=3", "optim.lr=fast")
    assert {p.split(":")[0] for p in problems} == {"data.batch_size", "trainer.max_stepz", "optim.lr"}


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    assert errors(tmp_path / "nope.yaml")[0].startswith("config: no such config file")
    bad = write_yaml(tmp_path, "bad.yaml", "edges: [unclosed\n")
    assert "not valid YAML" in errors(bad)[0]
    child = write_yaml(tmp_path, "child.yaml", "extends: missing_base.yaml\n")
    assert "extends[0]: no such config file" in errors(child)[0]


def test_malformed_override(tiny_yaml: Path) -> None:
    assert errors(tiny_yaml, "edges.si_st.enabled")[0].startswith("override 'edges.si_st.enabled': expected key=value")


def test_cli_exits_2_with_one_line_per_problem(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(tiny_yaml), "edges.si_st.loss=infonse", "models.student.type=nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert all(line.startswith("error: ") for line in err) and len(err) >= 2
    assert "Traceback" not in "\n".join(err)


def test_console_script_exit_code(tiny_yaml: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "validate", str(tiny_yaml), "edges.si_st.loss=nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: edges.si_st.loss: unknown loss 'nope'")
    assert "Traceback" not in proc.stderr


def test_validate_prints_graph(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tiny_yaml), "edges.si_tt.enabled=false", "edges.st_ti_kl.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "not loaded" in out  # every teacher edge is off
    assert "disabled edges:" in out and "si_tt" in out.split("disabled edges:")[1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["edges.si_tt.weight=-0.5"], "edges.si_tt.weight: must be >= 0"),
        (["edges.si_tt.weight=.nan"], "edges.si_tt.weight: must be a finite number, got nan"),
        (["edges.si_tt.weight=.inf"], "edges.si_tt.weight: must be a finite number, got inf"),
        (["edges.si_tt.args.temperature=0.005"],
         "edges.si_tt.args.temperature: temperature 0.005 is below 1/max_logit_scale = 0.01"),
        (["edges.si_st.args.temperature=0.02", "edges.si_st.args.max_logit_scale=20"],
         "edges.si_st.args.temperature: temperature 0.02 is below 1/max_logit_scale = 0.05"),
        (["edges.si_tt.args.max_logit_scale=0"], "edges.si_tt.args.max_logit_scale: max_logit_scale must be"),
        (["edges.st_ti_kl.args.student_temperature=0"], "edges.st_ti_kl.args.student_temperature: student_temperature must be"),
    ],
)
def test_values_that_would_train_silently_wrong_are_errors(tiny_yaml: Path, overrides: list[str], expected: str) -> None:
    problems = errors(tiny_yaml, *overrides)
    assert any(p.startswith(expected) for p in problems), problems


def test_weight_zero_is_a_monitored_edge(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Zero is allowed and labelled: the edge is computed and logged, with no gradient."""
    assert main(["validate", str(tiny_yaml), "edges.si_tt.weight=0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("si_tt"))
    assert "monitored: weight 0, no gradient" in line


def test_loading_runs_no_semantic_check(tiny_yaml: Path) -> None:
    """`load_config` is the schema only; the command decides to check (`load_checked`)."""
    from distill.config.load import load_config

    cfg = load_config(tiny_yaml, ["edges.si_st.loss=nope"])
    assert cfg.edges["si_st"].loss == "nope"
    with pytest.raises(ConfigError, match="edges.si_st.loss: unknown loss 'nope'"):
        load_checked(tiny_yaml, ["edges.si_st.loss=nope"])
