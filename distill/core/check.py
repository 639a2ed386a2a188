"""Semantic checks of a config against the registries, before any weights load.

Every check appends one line `<dotted.yaml.path>: <problem>`; the caller raises them
together (`load_checked` does it for a YAML file). Model dimensions come from
`Model.describe(**args)`, which reads at most a config file, never weights. The checks of
`stages:` and of weight inheritance (`models.<m>.init`) are here too.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from distill.augment import AugmentSpec
from distill.config.load import read_config
from distill.config.schema import Config
from distill.config.signature import check_kwargs
from distill.core.nodes import Catalogue, bind_inputs, layer_catalogue, reads_layers
from distill.core.schedule import schedule_problems, split_scheduled, weight_schedule
from distill.data.base import open_dataset
from distill.errors import ConfigError
from distill.losses.base import ArgumentError
from distill.models.inherit import init_problems
from distill.registry import DATASETS, LOSSES, MODELS

PRECISIONS = ("fp32", "fp16", "bf16")
TRAINER_PRECISIONS = ("16-mixed", "bf16-mixed", "32-true", "16-true", "bf16-true", "64-true", "transformer-engine",
                      "transformer-engine-float16", "16", "32", "64", "bf16")  # fmt: skip
"""What Lightning's `Trainer(precision=...)` accepts (tests/test_check_lightning.py compares)."""
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "fsdp_cpu_offload", "deepspeed",
              "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
              "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme", "single_device", "xla")  # fmt: skip
"""Lightning strategies by name (the `*_find_unused_parameters_*` spellings are accepted too)."""
NONFINITE = ("error", "skip")
SPLITS = ("train", "val", "test")
CACHE_MODES = ("auto", "require", "never")
STAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Tracker(NamedTuple):
    """What `trainer.loggers` knows of one experiment tracker (built in `distill.training.loggers`)."""

    modules: tuple[str, ...]
    """Any one of these importable is enough (none: it needs nothing beyond Lightning)."""
    managed: tuple[str, ...]
    """Arguments distill sets itself (where the files go, which run a resumption continues)."""


LOGGERS = {
    "csv": Tracker((), ("save_dir", "name", "version")),
    "tensorboard": Tracker(("tensorboard", "tensorboardX"), ("save_dir", "name", "version")),
    "wandb": Tracker(("wandb",), ("id", "version", "resume")),
    "mlflow": Tracker(("mlflow",), ("run_id",)),
}
"""Tracker name -> its needs; the pip extra of a tracker is `distill[<name>]`."""


def load_checked(path: str | Path, overrides: list[str] | None = None, *, data: bool = True) -> Config:
    """Load a YAML config and run every check: schema and semantic problems come out together.

    Args:
        path: The experiment YAML.
        overrides: Dotted `key=value` overrides.
        data: Check the data files too (missing shards, a batch larger than the data).

    Raises:
        ConfigError: One line per problem.
    """
    config, problems = read_config(path, overrides)
    if config is not None:
        problems += check(config, data=data)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def checked(config: Config) -> Config:
    """`config` itself, after raising its semantic problems (if any) as one `ConfigError`."""
    problems = check(config)
    if problems:
        raise ConfigError(problems)
    return config


def load_plugins(modules: list[str]) -> list[str]:
    """Import each module under `plugins:` (which registers its classes); return problems."""
    problems = []
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure is the user's plugin: report it
            problems.append(f"plugins[{i}]: cannot import {name!r}: {type(e).__name__}: {e}")
    return problems


def _registered(registry: Any, name: str, path: str, field: str, args: Any, problems: list[str]) -> tuple[Any, bool]:
    """(the class `name` names in `registry`, whether `args` fit its signature); the problems
    of both, at `<path>.<field>` and `<path>.args`, are appended to `problems`."""
    try:
        cls = registry.get(name, f"{path}.{field}")
    except ConfigError as e:
        problems.extend(e.problems)
        return None, False
    arg_problems = check_kwargs(cls, dict(args), f"{path}.args", f"{registry.kind} {name!r}")
    problems.extend(arg_problems)
    return cls, not arg_problems


def model_nodes(config: Config, problems: list[str]) -> dict[str, int]:
    """Node name -> dimension for every model whose type and args check out."""
    nodes: dict[str, int] = {}
    for name, model in config.models.items():
        path = f"models.{name}"
        if model.precision not in PRECISIONS:
            problems.append(f"{path}.precision: expected one of {PRECISIONS}, got {model.precision!r}")
        cls, args_ok = _registered(MODELS, model.type, path, "type", model.args, problems)
        if not args_ok:
            continue
        try:
            dims = cls.describe(**model.args)
        except ConfigError as e:
            problems.extend(f"{path}.args: {p}" for p in e.problems)
            continue
        for output, dim in dims.items():
            nodes[f"{name}.{output}"] = dim
    return nodes


def _check_edge(
    name: str, edge: Any, nodes: dict[str, int], frozen: set[str], broken: set[str], problems: list[str],
    config: Config, catalogue: Catalogue,
) -> None:
    path = f"edges.{name}"
    registered = edge.loss in LOSSES  # an unknown name is reported once, by _registered
    args, schedules = split_scheduled(edge.args, LOSSES.get(edge.loss) if registered else None, f"{path}.args",
                                      problems if registered else [])  # a scheduled argument: its step-0 value
    cls, args_ok = _registered(LOSSES, edge.loss, path, "loss", args, problems)
    if cls is None:
        return
    slots = cls.slots(len(edge.inputs))
    if slots is None:
        problems.append(f"{path}.inputs: loss {edge.loss!r} takes {cls.takes()}, got {len(edge.inputs)}")
        return
    binding = bind_inputs(path, edge, cls, slots, nodes, config, catalogue, broken, problems)  # names, layers
    if binding is None or not args_ok:
        return
    try:
        loss = cls(**args)
        loss.bind(slots)
    except ArgumentError as e:
        problems.append(f"{path}.args.{e.argument}: {e}")
        return
    except (ValueError, TypeError) as e:
        problems.append(f"{path}.args: {e}")
        return
    problems += schedule_problems(loss, schedules, f"{path}.args")
    for k, (dims, reads, names) in enumerate(zip(binding.widths, binding.reads, binding.pairs)):
        where = f"{path}.layers[{k}]" if binding.mapped else f"{path}.inputs"
        dim_problem = loss.dim_problem(dims)
        if dim_problem:
            shown = ", ".join(f"{n} ({d})" for n, d in dict(zip(names, dims.values())).items())
            problems.append(f"{where}: {dim_problem}: {shown}")
        layer_problem = loss.layer_problem(reads) if reads else None
        if layer_problem:
            problems.append(f"{where}: loss {edge.loss!r} cannot compare these nodes: {layer_problem}")
    if edge.enabled and all(node.split(".")[0] in frozen for node in edge.inputs):
        problems.append(
            f"{path}: no trainable endpoint ({', '.join(dict.fromkeys(edge.inputs))} are frozen)"
        )


def _check_weight(name: str, weight: Any, problems: list[str]) -> None:
    """An edge weight is a number or a schedule (`distill.core.schedule`), every value finite
    and >= 0. Zero is allowed: the edge is computed and logged (`train/edge/<name>`) but
    contributes no gradient, a monitored edge that `distill validate` labels as such; to skip
    the edge and its nodes' forward passes, disable it."""
    try:
        weight_schedule(weight, f"edges.{name}.weight")
    except ConfigError as e:
        problems.extend(e.problems)


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _count(x: Any, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _fraction(x: Any, closed_top: bool = True) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and 0 <= x and (x <= 1 if closed_top else x < 1)


def _devices(x: Any) -> bool:
    if x == "auto" or x == -1 or (_count(x, 1)):
        return True
    if isinstance(x, str):
        return all(p.strip().isdigit() for p in x.split(",") if p.strip()) and bool(x.strip(", "))
    return isinstance(x, list | tuple) and bool(x) and all(_count(i, 0) for i in x)


def known_strategy(x: Any) -> bool:
    return isinstance(x, str) and x.replace("_find_unused_parameters_true", "").replace(
        "_find_unused_parameters_false", "") in STRATEGIES


def field_problems(config: Config) -> list[str]:
    """Range and value checks of the numeric and Lightning fields, one line each."""
    d, o, t = config.data, config.optim, config.trainer
    rules: list[tuple[str, Any, bool, str]] = [
        ("seed", config.seed, _count(config.seed, 0) and config.seed < 2**32, "an integer in [0, 2**32)"),
        ("data.batch_size", d.batch_size, _count(d.batch_size, 1), "an integer >= 1"),
        ("data.eval_batch_size", d.eval_batch_size, _count(d.eval_batch_size, 1), "an integer >= 1"),
        ("data.num_workers", d.num_workers, _count(d.num_workers, 0), "an integer >= 0"),
        ("data.shuffle_buffer", d.shuffle_buffer, _count(d.shuffle_buffer, 0), "an integer >= 0"),
        ("data.steps_per_epoch", d.steps_per_epoch, d.steps_per_epoch is None or _count(d.steps_per_epoch, 1),
         "null or an integer >= 1"),
        ("optim.lr", o.lr, _positive(o.lr), "a finite number > 0"),
        ("optim.weight_decay", o.weight_decay, _fraction(o.weight_decay, True) or (o.weight_decay >= 0 and math.isfinite(o.weight_decay)),
         "a finite number >= 0"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(_fraction(b, False) for b in o.betas), "two numbers in [0, 1)"),
        ("optim.eps", o.eps, _positive(o.eps), "a finite number > 0"),
        ("optim.warmup_steps", o.warmup_steps, _count(o.warmup_steps, 0), "an integer >= 0"),
        ("optim.min_lr_ratio", o.min_lr_ratio, _fraction(o.min_lr_ratio), "a number in [0, 1]"),
        ("trainer.max_steps", t.max_steps, _count(t.max_steps, 1), "an integer >= 1"),
        ("trainer.num_nodes", t.num_nodes, _count(t.num_nodes, 1), "an integer >= 1"),
        ("trainer.accumulate_grad_batches", t.accumulate_grad_batches, _count(t.accumulate_grad_batches, 1),
         "an integer >= 1"),
        ("trainer.gradient_clip_val", t.gradient_clip_val, t.gradient_clip_val is None or _positive(t.gradient_clip_val),
         "null or a finite number > 0"),
        ("trainer.log_every_n_steps", t.log_every_n_steps, _count(t.log_every_n_steps, 1), "an integer >= 1"),
        ("trainer.val_check_interval", t.val_check_interval, t.val_check_interval is None or _count(t.val_check_interval, 1),
         "null or an integer >= 1"),
        ("trainer.limit_val_batches", t.limit_val_batches, t.limit_val_batches == 1.0 or _count(t.limit_val_batches, 0),
         "1.0 (all) or a number of batches >= 0 (streamed data takes no fraction)"),
        ("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, _count(t.checkpoint_every_n_steps, 1),
         "an integer >= 1"),
        ("trainer.precision", t.precision, str(t.precision) in TRAINER_PRECISIONS, f"one of {', '.join(TRAINER_PRECISIONS)}"),
        ("trainer.accelerator", t.accelerator, t.accelerator in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
        ("trainer.strategy", t.strategy, known_strategy(t.strategy), f"one of {', '.join(STRATEGIES)}"),
        ("trainer.devices", t.devices, _devices(t.devices), "'auto', -1 (all), a count >= 1, a list of device ids or '0,1'"),
        ("trainer.nonfinite", t.nonfinite, t.nonfinite in NONFINITE, f"one of {', '.join(NONFINITE)}"),
        ("trainer.local_loss", t.local_loss, isinstance(t.local_loss, bool), "true or false"),
        ("eval.chunk_size", config.eval.chunk_size, _count(config.eval.chunk_size, 1), "an integer >= 1"),
        ("eval.split", config.eval.split, config.eval.split in SPLITS, f"one of {', '.join(SPLITS)}"),
    ]  # fmt: skip
    problems = []
    for path, value, ok, want in rules:
        if not ok:
            close = difflib.get_close_matches(str(value), want.split(", "), n=1) if "one of" in want else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{path}: must be {want}, got {value!r}{hint}")
    return problems


def logger_entry(entry: Any) -> tuple[Any, Any]:
    """A `trainer.loggers` entry, `csv` or `{name: csv, args: {...}}`, as (name, args)."""
    if isinstance(entry, dict):
        return entry.get("name"), entry.get("args", {})  # a missing name is reported by logger_problems
    return entry, {}


def _importable(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None  # a bare folder (e.g. a ./wandb run dir) is no package


def logger_problems(loggers: list[Any]) -> list[str]:
    """Problems of `trainer.loggers`: unknown or repeated names, malformed entries, arguments
    distill sets itself, and trackers whose package is not installed (named with its extra)."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    known = ", ".join(LOGGERS)
    for i, entry in enumerate(loggers):
        path = f"trainer.loggers[{i}]"
        if isinstance(entry, dict):
            for key in set(entry) - {"name", "args"}:
                close = difflib.get_close_matches(str(key), ["name", "args"], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"{path}.{key}: unknown key; {hint}a logger entry takes name and args")
            if "name" not in entry:
                problems.append(f"{path}.name: missing; one of {known}")
                continue
        elif not isinstance(entry, str):
            problems.append(f"{path}: expected a logger name or {{name: ..., args: {{...}}}}, got {entry!r}")
            continue
        name, args = logger_entry(entry)
        where = f"{path}.name" if isinstance(entry, dict) else path
        if name not in LOGGERS:
            close = difflib.get_close_matches(str(name), list(LOGGERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: unknown logger {name!r}{hint} (known: {known})")
            continue
        if name in seen:
            problems.append(f"{where}: logger {name!r} is already trainer.loggers[{seen[name]}]")
            continue
        seen[name] = i
        if not isinstance(args, dict):
            problems.append(f"{path}.args: expected a mapping of {name} logger arguments, got {args!r}")
        else:
            for key in sorted(set(args) & set(LOGGERS[name].managed)):
                problems.append(f"{path}.args.{key}: set by distill (where the files go, which run a resumed "
                                "run continues); remove it")
        modules = LOGGERS[name].modules
        if modules and not any(_importable(m) for m in modules):
            problems.append(f"{where}: logger {name!r} needs the {modules[0]} package: pip install 'distill[{name}]'")
    return problems


def data_problems(config: Config) -> list[str]:
    """What the dataset finds missing in its files (shards, JSON, folders), and a batch
    larger than the whole training split when the dataset knows its size."""
    try:
        dataset = open_dataset(config.data.dataset, config.data.args)
    except ConfigError:
        return []  # the name or the arguments are reported by `check`
    problems = dataset.check()
    size = None if problems else dataset.train_size(config.data.captions_per_image)
    if size is not None and config.data.batch_size > size:
        problems.append(f"data.batch_size: {config.data.batch_size} is more than the {size} training samples "
                        "(the last partial batch is dropped, so an epoch would have no batch)")
    return problems


def check(config: Config, *, data: bool = False) -> list[str]:
    """All semantic problems of a schema-valid config, one line each.

    Args:
        config: The config.
        data: Also check the data files (`data_problems`): what commands that read the
            data ask for; a checkpoint read back for deployment need not find them.
    """
    problems = load_plugins(list(config.plugins))
    problems += field_problems(config)
    nodes = model_nodes(config, problems)
    problems += init_problems(config)
    frozen = {name for name, m in config.models.items() if m.frozen}
    if not config.models:
        problems.append("models: no model defined")
    broken = {name for name in config.models if not any(n.startswith(f"{name}.") for n in nodes)}
    catalogue = layer_catalogue(config, problems)
    for name, edge in config.edges.items():
        _check_weight(name, edge.weight, problems)
        _check_edge(name, edge, nodes, frozen, broken, problems, config, catalogue)
    enabled = [n for n, e in config.edges.items() if e.enabled]
    if not enabled:
        problems.append("edges: no enabled edge; enable at least one (edges.<name>.enabled=true)")
    if config.eval.model not in config.models:
        problems.append(
            f"eval.model: unknown model {config.eval.model!r}; models: {', '.join(config.models)}"
        )
    elif not {f"{config.eval.model}.image", f"{config.eval.model}.text"} <= set(nodes) and not any(
        p.startswith(f"models.{config.eval.model}") for p in problems
    ):
        problems.append(f"eval.model: model {config.eval.model!r} has no image and text outputs")
    _registered(DATASETS, config.data.dataset, "data", "dataset", config.data.args, problems)
    if config.data.captions_per_image not in ("all", "random"):
        problems.append(
            f"data.captions_per_image: expected 'all' or 'random', got {config.data.captions_per_image!r}"
        )
    if config.trainer.strategy.startswith("fsdp") and config.trainer.accelerator == "cpu":
        problems.append("trainer.strategy: Lightning runs fsdp on GPUs only; use ddp with trainer.accelerator=cpu")
    problems += logger_problems(list(config.trainer.loggers))
    if config.cache.mode not in CACHE_MODES:
        problems.append(f"cache.mode: expected one of {', '.join(CACHE_MODES)}, got {config.cache.mode!r}")
    if config.cache.layout not in ("global", "shards"):
        problems.append(f"cache.layout: expected 'global' or 'shards', got {config.cache.layout!r}")
    try:
        AugmentSpec.from_config(config.data.augment)
    except ConfigError as e:
        problems += e.problems
    for name in config.save_pretrained:
        if name not in config.models:
            problems.append(f"save_pretrained.{name}: unknown model; models: {', '.join(config.models)}")
            continue
        kind = config.models[name].type
        if kind in MODELS and not hasattr(MODELS.get(kind), "save_pretrained"):
            problems.append(f"save_pretrained.{name}: model type {config.models[name].type!r} cannot save_pretrained")
    if config.stages:
        problems += stage_problems(config)
    if data and not any(p.startswith(("data.dataset", "data.args")) for p in problems):
        problems += data_problems(config)
    layered = [e for e in enabled if reads_layers(config.edges[e])]
    if exact_accumulation(config) > 1 and layered:
        problems.append(f"trainer.accumulate_grad_batches: edge {layered[0]} reads layer nodes, which exact "
                        "accumulation (GradCache) cannot cache per micro-batch; raise data.batch_size or add devices")
    if exact_accumulation(config) > 1:
        pair = [n for e in enabled if e in config.edges for n in config.edges[e].inputs
                if n.endswith(".pair") and n.split(".", 1)[0] in config.models
                and not config.models[n.split(".", 1)[0]].frozen]
        if pair:
            problems.append(
                f"trainer.accumulate_grad_batches: node {pair[0]} is a trainable cross-encoder scoring pairs "
                "inside its loss: it has no output to cache per micro-batch, so in-batch edges cannot be "
                "accumulated exactly; raise data.batch_size or add devices instead"
            )
    return problems


def exact_accumulation(config: Config) -> int:
    """K when `trainer.accumulate_grad_batches: K > 1` meets an enabled in-batch edge: the
    loader then yields K x `data.batch_size` rows and the step accumulates them exactly
    (`distill.training.gradcache`); 1 when Lightning's own accumulation is exact (per-sample
    losses) or there is none."""
    k = config.trainer.accumulate_grad_batches
    if not isinstance(k, int) or k <= 1:
        return 1
    stage_edges = [e for s in config.stages for e in s.edges] if config.stages else []
    enabled = [n for n, e in config.edges.items() if e.enabled] + stage_edges
    return k if any(n in config.edges and _is_global(config.edges[n].loss) for n in enabled) else 1


def _is_global(loss: str) -> bool:
    return loss in LOSSES and bool(LOSSES.get(loss).global_batch)


def pattern_scope(pattern: str) -> str | None:
    """`models.student.image_*` -> `models.student`; None when the head has wildcards."""
    parts = pattern.split(".")
    head = ".".join(parts[:2])
    return head if len(parts) > 2 and not any(c in head for c in "*?[") else None


def stage_problems(config: Config) -> list[str]:
    """Problems of `stages:` that need no weights (patterns are checked again at fit time)."""
    problems: list[str] = []
    if config.resume not in (None, "last"):
        problems.append("resume: a staged run always resumes each stage from its last.ckpt; use 'last' or null")
    scopes = [f"models.{m}" for m, spec in config.models.items() if not spec.frozen]
    scopes += [f"losses.{e}" for e in config.edges]
    names: list[str] = []
    for i, stage in enumerate(config.stages):
        path = f"stages[{i}]"
        if not STAGE_NAME.match(stage.name):
            problems.append(f"{path}.name: {stage.name!r} must be letters, digits, '_', '-' or '.'")
        elif stage.name in names:
            problems.append(f"{path}.name: {stage.name!r} is already the name of stages[{names.index(stage.name)}]")
        if not stage.edges:
            problems.append(f"{path}.edges: no edge; list the edges this stage trains with")
        for j, edge in enumerate(stage.edges):
            if edge not in config.edges:
                close = difflib.get_close_matches(edge, list(config.edges), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"{path}.edges[{j}]: unknown edge {edge!r}; {hint}edges: {', '.join(config.edges)}")
        if not stage.train:
            problems.append(f"{path}.train: no pattern; use ['*'] to train every trainable parameter")
        for j, pattern in enumerate(stage.train):
            scope = pattern_scope(pattern)
            if pattern in scopes:
                problems.append(f"{path}.train[{j}]: pattern {pattern!r} matches no parameter; did you mean '{pattern}.*'?")
            elif scope is not None and scope not in scopes:
                problems.append(
                    f"{path}.train[{j}]: pattern {pattern!r} matches no parameter: {scope!r} is no trainable model "
                    f"or edge; trainable: {', '.join(s for s in scopes if s.startswith('models.'))}, losses.<edge>"
                )
        if stage.max_steps is not None and stage.max_steps < 1:
            problems.append(f"{path}.max_steps: must be >= 1, got {stage.max_steps}")
        if stage.lr is not None and not stage.lr > 0:
            problems.append(f"{path}.lr: must be > 0, got {stage.lr}")
        init = stage.init_from
        if init is not None and init != "config" and init not in names and not init.endswith(".ckpt"):
            later = " (a stage can only start from an earlier one)" if any(s.name == init for s in config.stages) else ""
            problems.append(f"{path}.init_from: {init!r} is no earlier stage, .ckpt path or 'config'{later}")
        if stage.build_index is not None and stage.build_index not in config.models:
            problems.append(f"{path}.build_index: unknown model {stage.build_index!r}; models: {', '.join(config.models)}")
        elif stage.build_index is not None and not any(
            config.edges[e].loss == "hard_negative" for e in stage.edges if e in config.edges
        ):
            problems.append(f"{path}.build_index: the stage enables no hard_negative edge to build an index for")
        names.append(stage.name)
    return problems
