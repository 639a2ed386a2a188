"""The typed configuration schema: one dataclass per section of an experiment YAML.

Merged with `OmegaConf.structured` in struct mode (`distill.config.load`), so an unknown
key fails with its dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """One model of the graph: a registered `type`, its constructor `args` and an optional
    `init` that copies weights from another model (see `distill.models.inherit`)."""

    type: str = MISSING
    frozen: bool = False
    precision: str = "fp32"
    args: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)


@dataclass
class EdgeConfig:
    """One edge: a registered loss, its input nodes in the loss's slot order, a weight."""

    loss: str = MISSING
    inputs: list[str] = MISSING
    weight: Any = 1.0
    """A number, or a schedule over training steps, e.g. `{schedule: cosine, start: 1.0, end:
    0.1, steps: 1000}` (kinds and checks: `distill.core.schedule`); values finite and >= 0.
    A loss's fixed temperatures in `args` may be schedules too (the loss's `schedulable`)."""
    enabled: bool = True
    args: dict[str, Any] = field(default_factory=dict)
    layers: Any = None
    """A layer map, for an edge whose inputs are layer nodes without an index
    (`student.text.hidden`): `uniform` (each of the first input's M layers reads one of the
    second's N, layer i <- (i + 1) N / M - 1, TinyBERT's mapping) or a list of index lists,
    one index per input (`[[0, 2], [1, 5]]`). Expanded and checked by `distill.core.nodes`."""


@dataclass
class AugmentConfig:
    """Training augmentation (`distill.augment`): one random resized crop per sample, shown to
    every model at its own resolution; flips and colour jitter off by default (captions name
    sides and colours). `views: V` draws each sample's view from V fixed views per image (what
    `distill cache` can store for a frozen teacher); null gives a fresh view every epoch."""

    enabled: bool = False
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = False
    color_jitter: float = 0.0
    hue: float = 0.0
    views: int | None = None
    seed: int = 0


@dataclass
class DataConfig:
    """Which registered dataset to read and how to batch it."""

    dataset: str = "synthetic"
    args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 2
    shuffle_buffer: int = 2000
    captions_per_image: str = "all"
    seed: int = 0
    steps_per_epoch: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """The subset of `lightning.Trainer` settings that distill exposes."""

    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    val_check_interval: int | None = None
    limit_val_batches: Any = 1.0
    """1.0: the whole validation split; an integer n: its first n batches (0: no validation).
    Fractions are refused: Lightning accepts none for streamed (iterable) data."""
    checkpoint_every_n_steps: int = 200
    progress_bar: bool = True
    """Show progress: a step bar in a terminal, a status line every few steps in a log file."""
    nonfinite: str = "error"
    """A NaN or infinite loss: `error` stops the run at that step naming the edges; `skip`
    drops the step (no update), counts it as `train/nonfinite_skipped`, and stops after
    `distill.training.module.MAX_SKIPPED_IN_A_ROW` skipped steps in a row."""
    local_loss: bool = False
    """Under DDP, each rank computes its in-batch losses only for its own rows against the
    gathered batch (B_local x B_global matrices instead of B_global x B_global, open_clip's
    `local_loss`), with the same gradients and logged values as computing them whole. Every
    built-in in-batch loss supports it; a loss that does not declare
    `distill.losses.base.EdgeLoss.local_loss` (e.g. an older plugin) is computed whole on
    every rank as before. No effect on one process. See docs/cluster.md."""
    loggers: list[Any] = field(default_factory=lambda: ["csv"])
    """Experiment trackers (Lightning's loggers), each a name (`csv`, `tensorboard`, `wandb`,
    `mlflow`) or `{name: ..., args: {...}}` with arguments for the Lightning logger; a resumed
    run continues the same tracker run (see `distill.training.loggers`)."""


@dataclass
class EvalConfig:
    """Which model's image and text nodes the retrieval evaluation embeds."""

    model: str = "student"
    split: str = "val"
    chunk_size: int = 1024


@dataclass
class StageConfig:
    """One training stage of a staged run (see `distill.training.stages`).

    `edges` are the edges enabled in the stage (every other edge is off); `train` are
    fnmatch patterns over the graph's parameter names (`models.student.image_*`,
    `losses.*`) of the parameters that train, every other parameter stays fixed.
    `max_steps` and `lr` default to `trainer.max_steps` and `optim.lr`. `init_from` is an
    earlier stage's name, a `.ckpt` path or `config` (the models as built); by default
    the previous stage's final checkpoint. `build_index` names a model that (re)builds the
    index file of every enabled `hard_negative` edge before the stage trains.
    """

    name: str = MISSING
    edges: list[str] = MISSING
    train: list[str] = field(default_factory=lambda: ["*"])
    max_steps: int | None = None
    lr: float | None = None
    init_from: str | None = None
    build_index: str | None = None


@dataclass
class CacheConfig:
    """Where teacher outputs are cached (`distill cache`) and whether `fit` reads them.

    `mode`: `auto` reads a cache whose fingerprint matches and runs the teacher otherwise;
    `require` refuses to train without a matching cache; `never` ignores caches (not `off`,
    which YAML reads as false).

    `layout`: `global` (one sorted key table per output; simple, for data up to ~10M
    samples) or `shards` (one cache file set per webdataset shard, found by shard name: no
    global table, built shard by shard in parallel and resumable; `distill.training.cache.shards`).
    """

    dir: str = "runs/cache"
    mode: str = "auto"
    layout: str = "global"


@dataclass
class Config:
    """The whole experiment."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    resume: str | None = None
    plugins: list[str] = field(default_factory=list)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    edges: dict[str, EdgeConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    save_pretrained: dict[str, str] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
