"""The typed configuration schema, YAML loading with `extends:` and command-line overrides.

`load_config(path, overrides)` returns a validated `Config` or raises one `ConfigError`
holding every problem, one line each, starting with the dotted YAML path. Nothing here
loads weights: semantic checks against the registries live in `distill.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from distill.errors import ConfigError


@dataclass
class ModelConfig:
    """One model of the graph: a registered `type`, its constructor `args` and an optional
    `init` that copies weights from another model (see `distill.models.init`)."""

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
    weight: float = 1.0
    enabled: bool = True
    args: dict[str, Any] = field(default_factory=dict)


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
    limit_val_batches: float = 1.0
    checkpoint_every_n_steps: int = 200
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Which model's image and text nodes the retrieval evaluation embeds."""

    model: str = "student"
    split: str = "val"
    chunk_size: int = 1024


@dataclass
class StageConfig:
    """One training stage of a staged run (see `distill.stages`).

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
    """

    dir: str = "runs/cache"
    mode: str = "auto"


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


def _read_yaml(path: Path, where: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{where}: no such config file {str(path)!r}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_raw(path: str | Path, _seen: tuple[Path, ...] = (), _where: str = "config") -> DictConfig:
    """Read a YAML file and the files it `extends:` (relative to it), merged base-first."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"{path}: extends cycle {chain}")
    raw = _read_yaml(path, _where)
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list):
        raise ConfigError(f"{path}: extends must be a file name or a list of them")
    merged = OmegaConf.create({})
    for i, base in enumerate(bases):
        merged = OmegaConf.merge(
            merged, load_raw(path.parent / str(base), (*_seen, path), f"{path}: extends[{i}]")
        )
    return OmegaConf.merge(merged, raw)


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`["edges.si_tt.enabled=false", ...]` -> a config to merge on top (YAML-typed values)."""
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError([f"override {o!r}: expected key=value" for o in bad])
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {str(e).splitlines()[0]}") from e


def _allowed_keys(schema: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    try:
        return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:
        return []


def _drop(raw: DictConfig, full_key: str) -> bool:
    parts = full_key.split(".")
    node: Any = raw
    for p in parts[:-1]:
        if not isinstance(node, DictConfig) or p not in node:
            return False
        node = node[p]
    if isinstance(node, DictConfig) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def merge_with_schema(raw: DictConfig) -> tuple[DictConfig, list[str]]:
    """Merge a raw config into the `Config` schema, collecting every problem.

    omegaconf stops at the first bad key, so the offending key is reported, removed from
    the raw config and the merge retried until it succeeds.
    """
    schema = OmegaConf.structured(Config)
    problems: list[str] = []
    raw = raw.copy()
    for _ in range(200):
        try:
            cfg = OmegaConf.merge(schema, raw)
            break
        except OmegaConfBaseException as e:
            key = str(e.full_key or "")
            if isinstance(e, ConfigKeyError):
                allowed = _allowed_keys(schema, key)
                hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
                problems.append(f"{key}: unknown key{hint}")
            else:
                problems.append(f"{key}: {str(e.msg if hasattr(e, 'msg') else e).splitlines()[0]}")
            if not _drop(raw, key):
                return schema, problems
    else:  # pragma: no cover - needs 200 distinct bad keys
        return schema, problems
    for key in OmegaConf.missing_keys(cfg):
        problems.append(f"{key}: missing value")
    return cfg, problems


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, merge and schema-check a config, then check it against the registries.

    Raises:
        ConfigError: with one line per problem, all problems at once.
    """
    raw = load_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_raw(raw)


def apply_overrides(raw: DictConfig, overrides: list[str]) -> DictConfig:
    """Merge dotted overrides into a raw config; a key through a list (`stages.1.lr=1e-4`)
    updates that item in place, since merging a mapping into a list fails in omegaconf."""
    parsed = parse_overrides(overrides)
    through_list = []
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        parts = key.split(".")
        prefixes = (OmegaConf.select(raw, ".".join(parts[:i]), throw_on_resolution_failure=False) for i in range(1, len(parts)))
        if any(isinstance(node, ListConfig) for node in prefixes):
            through_list.append(key)
    for key in through_list:
        value = OmegaConf.select(parsed, key)
        try:
            OmegaConf.update(raw, key, value, merge=True)
        except (OmegaConfBaseException, IndexError, ValueError) as e:
            raise ConfigError(f"override {key!r}: {str(e).splitlines()[0]}") from e
        _drop(parsed, key)
    while through_list and _prune_empty(parsed):
        pass
    return OmegaConf.merge(raw, parsed)


def _prune_empty(node: DictConfig) -> bool:
    """Delete empty mappings left behind by `_drop`; True if anything was deleted."""
    pruned = False
    for key in list(node.keys()):
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            if len(child) == 0:
                del node[key]
                pruned = True
            else:
                pruned = _prune_empty(child) or pruned
    return pruned


def prune_removed(raw: DictConfig) -> DictConfig:
    """Drop `models.<name>: null` and `edges.<name>: null`: how a file removes an inherited entry."""
    for section in ("models", "edges"):
        node = raw.get(section)
        if isinstance(node, DictConfig):
            for key in [k for k in node.keys() if node._get_node(k)._is_none()]:
                del node[key]
    return raw


def config_from_raw(raw: DictConfig) -> Config:
    """Schema-merge, resolve and validate an already merged raw config."""
    from distill.validate import validate

    cfg, problems = merge_with_schema(prune_removed(raw.copy()))
    if any(p.endswith(": missing value") for p in problems):
        raise ConfigError(problems)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([*problems, f"{e.full_key}: {str(e).splitlines()[0]}"]) from e
    # schema problems dropped their keys; the rest is still checked so all come out at once
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    problems += validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (what a run saves next to its checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain containers (for checkpoints' hyperparameters)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild and re-validate a config saved with `to_dict`."""
    return config_from_raw(OmegaConf.create(data))
