"""Staged training: stage validation, weight hand-off, fixed parameters, skip and resume."""

from __future__ import annotations

import csv
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from torch import nn

import distill.training.stages as stages
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.training.stages import train
from distill.training.trainer import metrics_csv

STAGES = """
stages:
  - {name: first, edges: [si_tt], max_steps: 3}
  - name: second
    edges: [si_st, st_ti_kl]
    train: ["models.student.text_*", "losses.*"]
    max_steps: 3
    lr: 1.0e-3
"""
SECOND = ["models.student.text_*", "losses.*"]


@pytest.fixture
def staged_yaml(tiny_yaml: Path) -> Path:
    tiny_yaml.write_text(tiny_yaml.read_text() + STAGES)
    return tiny_yaml


def problems(path: Path, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_checked(path, overrides)
    return e.value.problems


def test_stage_validation_errors_name_their_yaml_path(staged_yaml: Path) -> None:
    got = problems(staged_yaml, [
        "stages.0.edges=[si_tt, si_sst]", "stages.1.train=[models.student.text_*, models.teacher.x*, models.student]",
        "stages.0.init_from=second", "stages.1.build_index=studnet", "stages.1.max_steps=0",
    ])
    assert got[0].startswith("stages[0].edges[1]: unknown edge 'si_sst'; did you mean 'si_st'?")
    assert any(p.startswith("stages[1].train[1]: pattern 'models.teacher.x*' matches no parameter") for p in got)
    assert any(p.startswith("stages[1].train[2]: pattern 'models.student' matches no parameter; did you mean 'models.student.*'") for p in got)
    assert any(p.startswith("stages[0].init_from: 'second' is no earlier stage") for p in got)
    assert any(p.startswith("stages[1].build_index: unknown model 'studnet'") for p in got)
    assert any(p.startswith("stages[1].max_steps: must be >= 1") for p in got)
    assert all("\n" not in p for p in got)


def test_list_item_overrides(staged_yaml: Path) -> None:
    cfg = load_checked(staged_yaml, ["stages.1.lr=0.5", "stages.0.max_steps=7"])
    assert cfg.stages[1].lr == 0.5 and cfg.stages[0].max_steps == 7 and cfg.stages[1].name == "second"
    assert cfg.stages[0].train == ["*"]  # the default


def test_pattern_matching_no_parameter_fails_before_training(staged_yaml: Path) -> None:
    cfg = load_checked(staged_yaml, ["stages.1.train=[models.student.txt_*]"])
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.train\[0\]: pattern 'models.student.txt_\*' matches no trainable"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "stages" / "0_first" / "checkpoints").exists()


def test_fixed_submodules_stay_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))

    class Graph(nn.Module):
        frozen: set[str] = set()

        def __init__(self) -> None:
            super().__init__()
            self.models = nn.ModuleDict({"student": model})
            self.edges: dict = {}

    graph = Graph()
    assert stages.set_trainable(graph, ["models.student.0.*"]) == 2
    fixed = stages.fixed_modules(graph)
    assert fixed == [model[1]]  # the norm; the dropout has no parameters
    graph.train()
    stages.FixedInEval(fixed).on_train_batch_start(None, None, None, 0)  # type: ignore[arg-type]
    before = model[1].running_mean.clone()
    model(torch.randn(8, 4))
    assert torch.equal(model[1].running_mean, before) and model[0].training


def student_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len("graph."):]: v for k, v in state.items() if k.startswith(("graph.models.student.", "graph.losses."))}


def edge_columns(folder: Path) -> set[str]:
    rows = list(csv.DictReader(open(metrics_csv(folder))))
    return {c for c in rows[0] if c.startswith("train/edge/")}


def test_stage_hand_off_skip_and_resume(staged_yaml: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    starts: list[dict[str, torch.Tensor]] = []
    real = stages.set_trainable

    def record(graph: nn.Module, patterns: list[str]) -> int:  # weights as the stage starts
        starts.append({k: v.detach().clone() for k, v in graph.state_dict().items()})
        return real(graph, patterns)

    monkeypatch.setattr(stages, "set_trainable", record)
    cfg = load_checked(staged_yaml)
    out = Path(cfg.output_dir)
    metrics, module = train(cfg)
    first, second = out / "stages" / "0_first", out / "stages" / "1_second"
    assert "val/rsum" in metrics and (out / "final.ckpt").is_file() and (out / "metrics.json").is_file()

    # stage 2 starts from stage 1's final weights, tensor for tensor
    end1, end2 = student_state(first / "final.ckpt"), student_state(second / "final.ckpt")
    assert len(starts) == 2 and end1
    for key, value in end1.items():
        assert torch.equal(starts[1][key], value), key
    # stage 1 trained the image tower; stage 2 leaves everything outside its patterns alone
    init = starts[0]
    assert not torch.equal(init["models.student.image_mlp.0.weight"], end1["models.student.image_mlp.0.weight"])
    for key, value in end2.items():
        if any(fnmatchcase(key, p) for p in SECOND):
            continue
        assert torch.equal(value, end1[key]), f"{key} changed outside the stage's train patterns"
    assert not torch.equal(end2["models.student.text_mlp.1.weight"], end1["models.student.text_mlp.1.weight"])

    # each stage logs only its own edges
    assert edge_columns(first) == {"train/edge/si_tt"}
    assert edge_columns(second) == {"train/edge/si_st", "train/edge/st_ti_kl"}

    # a second invocation skips both finished stages
    capsys.readouterr()
    again, _ = train(load_checked(staged_yaml))
    assert again == metrics
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert not (second / "logs" / "version_1").exists()

    # a stage killed before it finished resumes from its last.ckpt
    (second / "final.ckpt").unlink()
    (second / "metrics.json").unlink()
    train(load_checked(staged_yaml, ["stages.1.max_steps=5"]))
    resumed = list(csv.DictReader(open(second / "logs" / "version_1" / "metrics.csv")))
    steps = {int(r["step"]) for r in resumed if r.get("train/loss")}
    assert steps and min(steps) >= 3  # steps 0-2 came from the checkpoint
    assert finished(second) and not (first / "logs" / "version_1").exists()


def finished(folder: Path) -> bool:
    return stages.finished(folder)


def test_leaner_faster_runs_end_to_end(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    from distill.negatives.store import load_negatives
    from tests.conftest import shrink

    exp = Path("experiments/leaner_faster.yaml")
    out = tmp_path / "run"
    overrides = shrink(exp, data_root, out, tiny_towers) + [f"stages.{i}.max_steps=1" for i in range(3)]
    metrics, _ = train(load_checked(exp, overrides))
    assert "val/rsum" in metrics
    names = ["0_intra", "1_image", "2_text"]
    assert all(stages.finished(out / "stages" / n) for n in names)
    assert edge_columns(out / "stages" / "1_image") == {f"train/edge/{e}" for e in ("si_st", "kd", "hn_i2t")}
    # each stage-2 index was built by the student from the weights that stage started with
    for name, index in (("0_intra", "image_stage"), ("1_image", "text_stage")):
        assert load_negatives(out / "index" / f"{index}.pt")["model"] == "student"
        assert (out / "index" / f"{index}.pt").stat().st_mtime >= (out / "stages" / name / "final.ckpt").stat().st_mtime
    text = [k for k in student_state(out / "stages" / "0_intra" / "final.ckpt") if k.startswith("models.student.text_")]
    a, b = student_state(out / "stages" / "0_intra" / "final.ckpt"), student_state(out / "stages" / "1_image" / "final.ckpt")
    assert text and all(torch.equal(a[k], b[k]) for k in text)  # the text side is fixed in stage 2a
