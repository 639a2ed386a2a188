"""The Lightning trainer of a run: strategy, callbacks, logging, atomic checkpoints, resume."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy

from distill.config.schema import Config
from distill.core.check import exact_accumulation
from distill.core.graph import split_node
from distill.errors import ConfigError
from distill.io import atomic_path
from distill.training.datamodule import DistillDataModule
from distill.training.loggers import LogLearningRate, make_loggers
from distill.training.module import DistillModule
from distill.training.progress import StepProgress

log = logging.getLogger(__name__)

PREVIOUS = "last.previous.ckpt"
"""The checkpoint `last.ckpt` replaced: the fallback when the newest one is damaged."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically, never with non-finite weights, read as data.

    - Writes go through `distill.io.atomic_path`: a killed run never leaves a truncated
      `.ckpt`; the `last.ckpt` being replaced is kept as `last.previous.ckpt`.
    - A state dict holding NaN or infinite values is refused (`ConfigError`), so a good
      checkpoint is never replaced by a diverged one.
    - Reads (resume) unpickle with `weights_only=True`: a checkpoint cannot run code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]  # fmt: skip
        if bad:
            raise ConfigError(
                f"train: step {checkpoint.get('global_step')}: {len(bad)} weight tensors hold NaN or infinite values "
                f"(e.g. {bad[0]}); {Path(path).name} not written, the previous checkpoint is intact"
            )
        keep = Path(path).with_name(PREVIOUS) if Path(path).name == "last.ckpt" else None
        with atomic_path(path, keep=keep) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def make_strategy(name: str) -> Any:
    """`ddp` tolerates parameters an edge subset leaves unused (e.g. a text tower no edge reads)."""
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=True)
    return name


def quiet_lightning() -> None:
    """Keep the console for progress and results: Lightning's banners and two warnings
    that are expected here (frozen teachers are in eval mode on purpose)."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # val/ retrieval metrics are computed over every rank's embeddings already (RetrievalRecall)
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def metrics_csv(out: str | Path) -> Path:
    """The metrics file of the latest run (or resumption) in a run folder."""
    versions = sorted((Path(out) / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not versions:
        raise FileNotFoundError(f"no metrics.csv under {Path(out) / 'logs'}")
    return versions[-1]


def usable(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable, truncated, no weights), or None.

    Cheap: the file is memory-mapped and unpickled as data, tensors are not read.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, refused pickle, ...: a damaged checkpoint
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return None if isinstance(ckpt, dict) and "state_dict" in ckpt else "no state_dict"


def resume_path(config: Config, out: Path) -> str | None:
    """`resume: last` -> the run's newest usable checkpoint: `checkpoints/last.ckpt`, the one
    it replaced (`last.previous.ckpt`), or the one Lightning writes when SLURM signals a
    requeue (`hpc_ckpt_N.ckpt`); newest first, a damaged one skipped with a warning. A path
    -> that file.

    Raises:
        ConfigError: A `resume` path that does not exist or cannot be read.
    """
    if not config.resume:
        return None
    if config.resume == "last":
        found = [p for p in [out / "checkpoints" / "last.ckpt", out / "checkpoints" / PREVIOUS, *out.glob("hpc_ckpt_*.ckpt")]
                 if p.is_file()]  # fmt: skip
        for candidate in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
            why = usable(candidate)
            if why is None:
                return str(candidate)
            log.warning("resume: %s is damaged (%s); trying the previous checkpoint", candidate, why)
        if found:
            log.warning("resume: no usable checkpoint in %s; starting from scratch", out)
        return None
    if not Path(config.resume).is_file():
        raise ConfigError(f"resume: no such checkpoint {config.resume!r}")
    why = usable(Path(config.resume))
    if why is not None:
        raise ConfigError(f"resume: {config.resume!r} cannot be read: {why}")
    return config.resume


def resumed_step(config: Config, out: Path) -> int | None:
    """The global step of the checkpoint `config.resume` resumes from; None when it starts afresh."""
    path = resume_path(config, out)
    if path is None:
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors are not read
    return int(ckpt.get("global_step", 0))


def make_datamodule(config: Config, module: DistillModule) -> pl.LightningDataModule:
    """The data module fed with each running model's own preprocessing, for the outputs it
    computes: none for a model the teacher-output cache serves entirely."""
    graph = module.graph
    live: dict[str, set[str]] = {}  # model -> the sides it runs on: image, text, pair (a layer node's side)
    for node in graph.needed_nodes():
        if node not in graph.cached:
            model, output = split_node(node)
            live.setdefault(model, set()).add(output.partition(".")[0])
    pre = {
        n: (graph.models[n].image_preprocess() if sides - {"text"} else None,  # a pair node reads both
            graph.models[n].text_preprocess() if sides - {"image"} else None)
        for n, sides in live.items()
    }
    ev = graph.models[config.eval.model]
    data = config.data  # exact accumulation: one loader batch holds the K micro-batches of a step
    k = exact_accumulation(config)
    data = dataclasses.replace(data, batch_size=data.batch_size * k) if k > 1 else data
    return DistillDataModule(data, pre, {config.eval.model: (ev.image_preprocess(), ev.text_preprocess())})


def make_trainer(config: Config, out: Path, callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A Trainer built from `config.trainer`, logging into the run folder with the trackers of
    `trainer.loggers` (continuing their runs when `config.resume` finds a checkpoint);
    `callbacks` run besides the checkpointing."""
    t = config.trainer
    loggers = [] if "logger" in overrides else make_loggers(config, out, resume_step=resumed_step(config, out))
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_on_train_epoch_end=False,
    )
    kwargs: dict[str, Any] = dict(
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t.strategy),
        precision=t.precision,
        # exact accumulation (in-batch edges) steps and clips in DistillModule itself
        accumulate_grad_batches=1 if exact_accumulation(config) > 1 else t.accumulate_grad_batches,
        gradient_clip_val=None if exact_accumulation(config) > 1 else t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=None,
        val_check_interval=t.val_check_interval or t.max_steps,
        limit_val_batches=1.0 if t.limit_val_batches == 1.0 else int(t.limit_val_batches),
        num_sanity_val_steps=0,
        enable_progress_bar=False,  # StepProgress counts the run's steps instead of epochs
        enable_model_summary=False,
        logger=loggers or False,  # see distill.training.loggers: where each writes, how each resumes
        callbacks=[checkpoint, LogLearningRate(), *([StepProgress()] if t.progress_bar else []), *callbacks],
        plugins=[SafeCheckpointIO()],
        default_root_dir=str(out),
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
