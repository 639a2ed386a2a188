"""Semantic checks of a config against the registries, before any weights load.

Every check appends one line `<dotted.yaml.path>: <problem>`; the caller raises them
together. Model dimensions come from `Model.describe(**args)`, which reads at most a
config file, never weights.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

from distill.errors import ConfigError
from distill.registry import DATASETS, LOSSES, MODELS
from distill.signature import check_kwargs

if TYPE_CHECKING:
    from distill.config import Config

PRECISIONS = ("fp32", "fp16", "bf16")
CACHE_MODES = ("auto", "require", "never")


def load_plugins(modules: list[str]) -> list[str]:
    """Import the built-in registries, then each module under `plugins:`; return problems."""
    import distill.data  # noqa: F401
    import distill.losses  # noqa: F401
    import distill.models  # noqa: F401

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


def validate(config: Config) -> list[str]:
    """All semantic problems of a schema-valid config, one line each."""
    from distill.models.init import init_problems

    problems = load_plugins(list(config.plugins))
    nodes = model_nodes(config, problems)
    problems += init_problems(config)
    frozen = {name for name, m in config.models.items() if m.frozen}
    if not config.models:
        problems.append("models: no model defined")
    broken = {name for name in config.models if not any(n.startswith(f"{name}.") for n in nodes)}
    for name, edge in config.edges.items():
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
        from distill.stages import stage_problems

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
