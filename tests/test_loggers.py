"""Experiment trackers (`trainer.loggers`): what reaches TensorBoard, resuming into the same
run, the config errors, and W&B / MLflow offline where they are installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.core.check import LOGGERS, load_checked
from distill.errors import ConfigError
from distill.training.loggers import BUILDERS, CLASSES, RECORD, make_loggers
from distill.training.stages import train
from tests.conftest import TINY

TRACKERS = "trainer.loggers=[csv,tensorboard]"


def scalars(events: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of one event file or of every file in a folder."""
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def events(out: Path) -> list[Path]:
    return sorted((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """With CSV and TensorBoard, the tiny config fitted 4 steps (checkpoints at 2 and 4), then
    resumed (`resume=last`) to 6; then, as after a kill past a checkpoint, resumed once more
    from the step-4 checkpoint (`last.ckpt` removed), replaying steps 4 and 5."""
    folder = tmp_path_factory.mktemp("trackers")
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(out=folder / "run", data=data_root))
    out, run = folder / "run", [TRACKERS, "trainer.checkpoint_every_n_steps=2"]
    train(load_checked(path, [*run, "trainer.max_steps=4"]))
    first, record = events(out), json.loads((out / RECORD).read_text())
    train(load_checked(path, [*run, "trainer.max_steps=6", "resume=last"]))
    second = events(out)
    (out / "checkpoints" / "last.ckpt").unlink()  # last.previous.ckpt: step 4
    train(load_checked(path, [*run, "trainer.max_steps=6", "resume=last"]))
    return {"out": out, "first": first, "second": second, "record": record}


def test_tensorboard_holds_edges_temperature_lr_and_recalls(resumed: dict[str, Any]) -> None:
    tags = scalars(resumed["first"][0])
    cfg = load_checked(resumed["out"] / "config.yaml")
    wanted = {"train/loss", "train/lr", "val/rsum", "val/i2t_r1", "val/t2i_r1"}
    wanted |= {f"train/edge/{name}" for name in cfg.edges}  # every edge of the tiny graph is enabled
    wanted.add("train/temperature/si_st")  # the learnable infonce edge; si_tt's is fixed
    assert wanted <= set(tags), sorted(wanted - set(tags))
    assert "train/temperature/si_tt" not in tags
    assert all(math.isfinite(v) for tag in wanted for _, v in tags[tag])
    tau = [v for _, v in tags["train/temperature/si_st"]]
    assert all(0.05 < t < 0.2 for t in tau)  # 1/logit scale, started at temperature 0.1


def test_a_resumed_run_continues_the_same_tensorboard_version(resumed: dict[str, Any]) -> None:
    out = resumed["out"]
    assert resumed["record"]["tensorboard"] == {"version": 0}
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["version_0"]
    (first,) = resumed["first"]
    (later,) = [f for f in resumed["second"] if f != first]
    before, after = scalars(first), scalars(later)
    assert [s for s, _ in before["train/loss"]] == [0, 1, 2, 3]
    assert [s for s, _ in after["train/loss"]] == [4, 5]  # the steps after the first run's
    assert max(s for s, _ in after["val/rsum"]) > max(s for s, _ in before["val/rsum"])
    # CSV keeps its behaviour: each resumption logs into a version of its own, nothing overwritten
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["version_0", "version_1", "version_2"]
    assert "train/lr" in (out / "logs" / "version_1" / "metrics.csv").read_text().splitlines()[0]


def test_a_replayed_step_replaces_the_interrupted_runs_in_tensorboard(resumed: dict[str, Any]) -> None:
    out = resumed["out"]
    (third,) = [f for f in events(out) if f not in resumed["second"]]
    assert [s for s, _ in scalars(third)["train/loss"]] == [4, 5]
    whole = scalars(out / "tensorboard" / "version_0")  # the folder reads as one curve, steps once each
    assert [s for s, _ in whole["train/loss"]] == [0, 1, 2, 3, 4, 5]
    assert whole["train/loss"][4:] == scalars(third)["train/loss"]  # the replay's values, not the purged ones


def problems(path: Path, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_checked(path, overrides)
    return e.value.problems


@pytest.mark.parametrize("loggers,expected", [
    ("[csv,tensorbord]", "trainer.loggers[1]: unknown logger 'tensorbord'; did you mean 'tensorboard'? "
                         "(known: csv, tensorboard, wandb, mlflow)"),
    ("[csv,csv]", "trainer.loggers[1]: logger 'csv' is already trainer.loggers[0]"),
    ("[{name: csv, argz: {}}]", "trainer.loggers[0].argz: unknown key; did you mean 'args'? a logger entry takes name and args"),
    ("[{args: {}}]", "trainer.loggers[0].name: missing; one of csv, tensorboard, wandb, mlflow"),
    ("[{name: tensorboard, args: {version: 3}}]", "trainer.loggers[0].args.version: set by distill"),
    ("[3]", "trainer.loggers[0]: expected a logger name or {name: ..., args: {...}}, got 3"),
])  # fmt: skip
def test_bad_logger_entries_are_one_line_each(tiny_yaml: Path, loggers: str, expected: str) -> None:
    found = problems(tiny_yaml, [f"trainer.loggers={loggers}"])
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_names_its_extra(tiny_yaml: Path, name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        pytest.skip(f"{name} is installed")
    found = problems(tiny_yaml, [f"trainer.loggers=[csv,{name}]"])
    assert found == [f"trainer.loggers[1]: logger {name!r} needs the {name} package: pip install 'distill[{name}]'"]


def test_the_default_is_csv_and_every_known_tracker_has_a_builder(tiny_yaml: Path) -> None:
    assert load_checked(tiny_yaml).trainer.loggers == ["csv"]
    assert set(BUILDERS) == set(CLASSES) == set(LOGGERS)


def test_logger_arguments_reach_the_logger_and_typos_are_named(tiny_yaml: Path, tmp_path: Path) -> None:
    cfg = load_checked(tiny_yaml, ["trainer.loggers=[{name: csv, args: {flush_logs_every_n_steps: 7}}]"])
    (logger,) = make_loggers(cfg, tmp_path, resume_step=None)
    assert logger.log_dir == str(tmp_path / "logs" / "version_0")
    cfg = load_checked(tiny_yaml, ["trainer.loggers=[{name: csv, args: {flush_every_n_steps: 7}}]"])
    with pytest.raises(ConfigError, match=r"trainer.loggers\[0\].args.flush_every_n_steps: the csv logger takes no "
                                          r"argument 'flush_every_n_steps'; did you mean 'flush_logs_every_n_steps'"):
        make_loggers(cfg, tmp_path, resume_step=None)


def test_wandb_offline_in_the_run_folder_and_resumed_by_id(tiny_yaml: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_checked(tiny_yaml, ["trainer.loggers=[wandb]"])
    (first,) = make_loggers(cfg, tmp_path, resume_step=None)
    run_id = json.loads((tmp_path / RECORD).read_text())["wandb"]["id"]
    assert first._offline and first.save_dir == str(tmp_path) and first.version == run_id
    (again,) = make_loggers(cfg, tmp_path, resume_step=5)
    assert again.version == run_id and again._wandb_init["resume"] == "allow"
    (fresh,) = make_loggers(cfg, tmp_path, resume_step=None)
    assert fresh.version != run_id


def test_mlflow_file_store_in_the_run_folder_and_resumed_by_run_id(tiny_yaml: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_checked(tiny_yaml, ["trainer.loggers=[mlflow]"])
    (first,) = make_loggers(cfg, tmp_path, resume_step=None)
    run_id = json.loads((tmp_path / RECORD).read_text())["mlflow"]["run_id"]
    assert run_id == first.run_id and (tmp_path / "mlruns").is_dir()
    first.log_metrics({"train/loss": 1.0}, step=0)
    (again,) = make_loggers(cfg, tmp_path, resume_step=5)
    assert again.run_id == run_id
    again.log_hyperparams({"resume": "last"})  # a changed parameter must not fail the resumed run
    again.log_metrics({"train/loss": 0.5}, step=5)
    history = again.experiment.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 5]


def test_a_fresh_start_takes_a_new_tensorboard_version_and_a_resumption_the_recorded_one(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    cfg = load_checked(tiny_yaml, [TRACKERS])
    _, first = make_loggers(cfg, tmp_path, resume_step=None)
    assert first.version == 0 and json.loads((tmp_path / RECORD).read_text()) == {"tensorboard": {"version": 0}}
    Path(first.log_dir).mkdir(parents=True)  # SummaryWriter makes it at the first write
    _, second = make_loggers(cfg, tmp_path, resume_step=None)  # a new run in the same folder
    assert second.version == 1 and json.loads((tmp_path / RECORD).read_text()) == {"tensorboard": {"version": 1}}
    Path(second.log_dir).mkdir()
    _, resumed = make_loggers(cfg, tmp_path, resume_step=3)
    assert resumed.version == 1 and resumed._kwargs["purge_step"] == 3
