"""Experiment trackers: Lightning's own loggers, built from `trainer.loggers`, resumable.

```yaml
trainer:
  loggers: [csv, tensorboard]                    # the default is [csv]
  # an entry may pass arguments to the Lightning logger:
  # loggers: [csv, {name: wandb, args: {project: sweeps}}, {name: mlflow, args: {tracking_uri: "http://mlflow:5000"}}]
```

Each tracker writes under `output_dir`, and a resumed run (`resume=last`, or a checkpoint
path) continues the same tracker run; which one is recorded in `output_dir/trackers.json`:

- `csv`: `logs/version_N/metrics.csv`, a new N per start, so a resumed run never overwrites
  the rows of the first (`distill.training.trainer.metrics_csv` reads the newest).
- `tensorboard`: `tensorboard/version_N`; a resumed run writes into the same N, so the
  curves continue (`tensorboard --logdir <output_dir>`), and hides what the interrupted run
  logged after its checkpoint's step (SummaryWriter's `purge_step`): those steps are replayed.
- `wandb`: offline by default, into `output_dir/wandb` (`wandb sync` uploads it later;
  `WANDB_MODE=online` or `args: {offline: false}` logs live). The run id is chosen here and
  recorded; a resumed run passes it again with `resume="allow"`, which continues the run
  online. Offline, W&B does not resume (wandb#2423): the resumption writes a second
  `offline-run-*-<id>` folder with the same id, to sync after the first.
- `mlflow`: a file store `output_dir/mlruns` unless `args.tracking_uri` or
  `MLFLOW_TRACKING_URI` names a server. The run id is recorded; a resumed run logs into it
  (and keeps the parameters the first run logged: MLflow parameters are write-once).

What is logged (`DistillModule` and `LogLearningRate`): `train/loss`, `train/edge/<edge>`
for every enabled edge, `train/temperature/<edge>` (tau = 1 / logit scale) for every edge
with a learnable temperature, `train/lr`, and the validation retrieval metrics
`val/<metric>` (recalls in both directions and `val/rsum`); also `train/skipped` (broken
samples) and, under `trainer.nonfinite: skip`, `train/nonfinite_skipped`. Only rank zero writes.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from distill.config.schema import Config
from distill.core.check import LOGGERS, logger_entry
from distill.distributed import is_rank_zero
from distill.errors import ConfigError
from distill.io import write_json

log = logging.getLogger(__name__)

RECORD = "trackers.json"
"""In the run folder: which tracker run (TensorBoard version, W&B and MLflow run ids) a
resumption continues."""


class LogLearningRate(pl.Callback):
    """Log `train/lr`, the learning rate of the step about to run (every parameter group
    follows the same schedule, so the first group's)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        if trainer.optimizers:
            pl_module.log("train/lr", float(trainer.optimizers[0].param_groups[0]["lr"]), batch_size=1)


class ResumedMLFlowLogger(MLFlowLogger):
    """An MLflow run continued: its parameters were logged by the first run, and MLflow
    refuses to change a logged parameter (a resumption's `resume: last` would be one)."""

    def log_hyperparams(self, params: Any) -> None:
        pass


def read_record(out: Path) -> dict[str, dict[str, Any]]:
    """The tracker runs recorded in a run folder (empty when none, or unreadable)."""
    try:
        data = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _versions(folder: Path) -> list[int]:
    return [int(p.name[8:]) for p in folder.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]


Builder = Callable[[Config, Path, dict[str, Any], dict[str, Any] | None, int | None], tuple[Logger, dict]]
"""(config, run folder, the entry's args, the recorded run or None when not resuming, the step
resumed from) -> (the logger, what to record of its run)."""


def _csv(config: Config, out: Path, args: dict[str, Any], before: dict[str, Any] | None,
         step: int | None) -> tuple[Logger, dict]:  # fmt: skip
    return CSVLogger(str(out), name="logs", **args), {}  # logs/version_N: a new N per start


def _tensorboard(config: Config, out: Path, args: dict[str, Any], before: dict[str, Any] | None,
                 step: int | None) -> tuple[Logger, dict]:  # fmt: skip
    versions = _versions(out / "tensorboard")
    if before is not None and isinstance(before.get("version"), int):
        version = before["version"]
    elif before is not None and versions:  # resumed, but the first run left no record
        version = max(versions)
    else:
        version = max(versions, default=-1) + 1
    args = {"default_hp_metric": False, **args}
    if step is not None:  # training steps from `step` on are replayed: hide the interrupted run's
        args.setdefault("purge_step", step)
    return TensorBoardLogger(str(out), name="tensorboard", version=version, **args), {"version": version}


def _wandb(config: Config, out: Path, args: dict[str, Any], before: dict[str, Any] | None,
           step: int | None) -> tuple[Logger, dict]:  # fmt: skip
    run_id = before.get("id") if before is not None else None
    run_id = run_id if isinstance(run_id, str) else uuid.uuid4().hex[:12]
    mode = os.environ.get("WANDB_MODE", "offline")  # a cluster node rarely reaches the W&B servers
    args = {"project": os.environ.get("WANDB_PROJECT", "distill"), "name": config.name, "save_dir": str(out),
            "offline": mode in ("offline", "dryrun"), **args}  # fmt: skip
    return WandbLogger(id=run_id, resume="allow", **args), {"id": run_id}


def _mlflow(config: Config, out: Path, args: dict[str, Any], before: dict[str, Any] | None,
            step: int | None) -> tuple[Logger, dict]:  # fmt: skip
    args = {"experiment_name": "distill", "run_name": config.name, **args}
    if "tracking_uri" not in args and "save_dir" not in args:  # a file store in the run folder
        args["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
    run_id = before.get("run_id") if before is not None else None
    if isinstance(run_id, str):
        return ResumedMLFlowLogger(run_id=run_id, **args), {"run_id": run_id}
    logger = MLFlowLogger(**args)
    # the run exists from here on (rank zero creates it), so a run killed early resumes into it
    return logger, ({"run_id": logger.run_id} if is_rank_zero() else {})


BUILDERS: dict[str, Builder] = {
    "csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow,
}  # fmt: skip
"""Tracker name -> (logger, what to record); the names are `distill.core.check.LOGGERS`."""
CLASSES = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLFlowLogger}


def _unknown_args(name: str, args: dict[str, Any], path: str) -> list[str]:
    """Arguments the Lightning logger does not take (none when it forwards `**kwargs`)."""
    params = inspect.signature(CLASSES[name].__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []  # TensorBoard's go to SummaryWriter, W&B's to wandb.init
    takes = [n for n in params if n != "self"]
    problems = []
    for key in args:
        if key not in takes:
            close = difflib.get_close_matches(key, takes, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{path}.{key}: the {name} logger takes no argument {key!r}; {hint}it takes: {', '.join(takes)}")
    return problems


def make_loggers(config: Config, out: Path, *, resume_step: int | None) -> list[Logger]:
    """The Lightning loggers of `config.trainer.loggers`, writing under `out`.

    Args:
        config: A checked config.
        out: The run folder.
        resume_step: The global step of the checkpoint training resumes from: the trackers
            then continue the runs recorded in `out/trackers.json`. None: new runs.

    Raises:
        ConfigError: Arguments the logger refuses, or a tracker whose package is missing.
    """
    resuming = resume_step is not None
    before = read_record(out) if resuming else {}
    record: dict[str, dict[str, Any]] = {}
    loggers: list[Logger] = []
    for i, entry in enumerate(config.trainer.loggers):
        name, args = logger_entry(entry)
        path = f"trainer.loggers[{i}]"
        problems = _unknown_args(name, dict(args), f"{path}.args")
        if problems:
            raise ConfigError(problems)
        previous = before.get(name, {}) if resuming else None
        if resuming and name in ("wandb", "mlflow") and not previous:
            log.warning("%s: %s has no %s run recorded in %s; starting a new one", path, out, name, RECORD)
        try:
            logger, record[name] = BUILDERS[name](config, out, dict(args), previous, resume_step)
        except ModuleNotFoundError as e:
            needs = LOGGERS[name].modules[0]  # as distill.core.check words it, for a config it did not check
            raise ConfigError(f"{path}: logger {name!r} needs the {needs} package: pip install 'distill[{name}]'") from e
        except (TypeError, ValueError, MisconfigurationException) as e:
            raise ConfigError(f"{path}.args: the {name} logger refuses them: {e}") from e
        loggers.append(logger)
    record = {k: v for k, v in record.items() if v}
    if is_rank_zero() and (record or (out / RECORD).is_file()):
        # resumed: the runs continue (a tracker added since starts its own); new: only this run's
        write_json(out / RECORD, {**before, **record}, sort_keys=True)
    return loggers
