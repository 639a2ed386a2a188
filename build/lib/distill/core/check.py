"""Semantic checks of a config against the registries, before any weights load.

Every check appends one line `<dotted.yaml.path>: <problem>`; the caller raises them
together (`load_checked` does it for a YAML file). Model dimensions come from
`Model.describe(**args)`, which reads at most a config file, never weights. The checks of
`stages:` and of weight inheritance (`models.<m>.init`) are here too.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
from pathlib import Path
from typing import Any

from distill.config.load import read_config
from distill.config.schema import Config
from distill.config.signature import check_kwargs
from distill.errors import ConfigError
from distill.losses.base import ArgumentError
from distill.models.inherit import init_problems
from distill.registry import DATASETS, LOSSES, MODELS

PRECISIONS = ("fp32", "fp16", "bf16")
CACHE_MODES = ("auto", "require", "never")
STAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def load_checked(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and run every check: schema and semantic problems come out together.

    Raises:
        ConfigError: One line per problem.
    """
    config, problems = read_config(path, overrides)
    if config is not None:
        problems += check(config)
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


def model_nodes(config: Config, problems: list[str]) -> dict[str, int]:
    """Node name -> dimension for every model whose type and args check out."""
    nodes: dict[str, int] = {}
    for name, model in config.models.items():
        path = f"models.{name}"
        if model.precision not in PRECISIONS:
            problems.append(f"{path}.precision: expected one of {PRECISIONS}, got {model.precision!r}")
        try:
            cls = MODELS.get(model.type, f"{path}.type")
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        arg_problems = check_kwargs(cls, dict(model.args), f"{path}.args", f"model {model.type!r}")
        problems.extend(arg_problems)
        if arg_problems:
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
    name: str, edge: Any, nodes: dict[str, int], frozen: set[str], broken: set[str], problems: list[str]
) -> None:
    path = f"edges.{name}"
    try:
        cls = LOSSES.get(edge.loss, f"{path}.loss")
    except ConfigError as e:
        problems.extend(e.problems)
        return
    arg_problems = check_kwargs(cls, dict(edge.args), f"{path}.args", f"loss {edge.loss!r}")
    problems.extend(arg_problems)
    if len(edge.inputs) != len(cls.inputs):
        problems.append(
            f"{path}.inputs: loss {edge.loss!r} takes {len(cls.inputs)} inputs "
            f"({', '.join(cls.inputs)}), got {len(edge.inputs)}"
        )
        return
    known = True
    for i, node in enumerate(edge.inputs):
        if node not in nodes:
            known = False
            if node.split(".")[0] in broken:
                continue  # the model's own problem is already reported
            close = difflib.get_close_matches(node, list(nodes), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{path}.inputs[{i}]: unknown node {node!r}; {hint}nodes: {', '.join(sorted(nodes))}"
            )
    if not known or arg_problems:
        return
    for i, (slot, node) in enumerate(zip(cls.inputs, edge.inputs)):
        if (slot == "pair") != node.endswith(".pair"):  # a fused model's pair scorer is no embedding
            want = "a fused model's pair node (<model>.pair)" if slot == "pair" else "an embedding node, not a pair scorer"
            problems.append(f"{path}.inputs[{i}]: slot {slot!r} of loss {edge.loss!r} takes {want}; got {node!r}")
            known = False
    if not known:
        return
    try:
        loss = cls(**edge.args)
    except ArgumentError as e:
        problems.append(f"{path}.args.{e.argument}: {e}")
        return
    except (ValueError, TypeError) as e:
        problems.append(f"{path}.args: {e}")
        return
    dims = {slot: nodes[node] for slot, node in zip(cls.inputs, edge.inputs)}
    dim_problem = loss.dim_problem(dims)
    if dim_problem:
        shown = ", ".join(f"{n} ({nodes[n]})" for n in dict.fromkeys(edge.inputs))
        problems.append(f"{path}.inputs: {dim_problem}: {shown}")
    if edge.enabled and all(node.split(".")[0] in frozen for node in edge.inputs):
        problems.append(
            f"{path}: no trainable endpoint ({', '.join(dict.fromkeys(edge.inputs))} are frozen)"
        )


def _check_weight(name: str, weight: float, problems: list[str]) -> None:
    """An edge weight is finite and >= 0. Zero is allowed: the edge is computed and logged
    (`train/edge/<name>`) but contributes no gradient, a monitored edge that `distill
    validate` labels as such; to skip the edge and its nodes' forward passes, disable it."""
    if not math.isfinite(weight):
        problems.append(f"edges.{name}.weight: must be a finite number, got {weight}")
    elif weight < 0:
        problems.append(f"edges.{name}.weight: must be >= 0 (a negative weight maximises the loss), got {weight}")


def check(config: Config) -> list[str]:
    """All semantic problems of a schema-valid config, one line each."""
    problems = load_plugins(list(config.plugins))
    nodes = model_nodes(config, problems)
    problems += init_problems(config)
    frozen = {name for name, m in config.models.items() if m.frozen}
    if not config.models:
        problems.append("models: no model defined")
    broken = {name for name in config.models if not any(n.startswith(f"{name}.") for n in nodes)}
    for name, edge in config.edges.items():
        _check_weight(name, edge.weight, problems)
        _check_edge(name, edge, nodes, frozen, broken, problems)
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
    try:
        dataset_cls = DATASETS.get(config.data.dataset, "data.dataset")
        problems.extend(
            check_kwargs(dataset_cls, dict(config.data.args), "data.args", f"dataset {config.data.dataset!r}")
        )
    except ConfigError as e:
        problems.extend(e.problems)
    if config.data.captions_per_image not in ("all", "random"):
        problems.append(
            f"data.captions_per_image: expected 'all' or 'random', got {config.data.captions_per_image!r}"
        )
    if config.trainer.strategy.startswith("fsdp") and config.trainer.accelerator == "cpu":
        problems.append("trainer.strategy: Lightning runs fsdp on GPUs only; use ddp with trainer.accelerator=cpu")
    if config.cache.mode not in CACHE_MODES:
        problems.append(f"cache.mode: expected one of {', '.join(CACHE_MODES)}, got {config.cache.mode!r}")
    for name in config.save_pretrained:
        if name not in config.models:
            problems.append(f"save_pretrained.{name}: unknown model; models: {', '.join(config.models)}")
            continue
        kind = config.models[name].type
        if kind in MODELS and not hasattr(MODELS.get(kind), "save_pretrained"):
            problems.append(f"save_pretrained.{name}: model type {config.models[name].type!r} cannot save_pretrained")
    if config.stages:
        problems += stage_problems(config)
    global_edges = [n for n in enabled if n in config.edges and _is_global(config.edges[n].loss)]
    if config.trainer.accumulate_grad_batches > 1 and global_edges:
        problems.append(
            "trainer.accumulate_grad_batches: gradient accumulation would shrink the batch that "
            f"in-batch losses compare against (edges {', '.join(global_edges)}); raise "
            "data.batch_size or add devices instead"
        )
    return problems


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
