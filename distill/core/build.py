"""The one place that turns a validated `Config` into modules (models, losses, graph)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from torch import Tensor

from distill.config.schema import Config
from distill.core.check import load_plugins, model_nodes
from distill.core.graph import Edge, KnowledgeGraph, split_node
from distill.core.nodes import bind_inputs, layer_catalogue
from distill.core.schedule import is_schedule, split_scheduled, weight_schedule
from distill.errors import ConfigError
from distill.models.base import Encoder
from distill.models.inherit import apply_init, init_order
from distill.registry import LOSSES, MODELS


def models_to_load(config: Config, cached: Collection[str] = ()) -> list[str]:
    """Models read by an enabled edge through a node not in `cached` (node names served by
    the teacher-output cache), plus the evaluated model; others are never loaded."""
    names = [split_node(n)[0] for e in config.edges.values() if e.enabled for n in e.inputs if n not in cached]
    names.append(config.eval.model)
    names.extend(config.save_pretrained)
    return [m for m in dict.fromkeys(names) if m in config.models]


def load_models(config: Config, names: list[str]) -> dict[str, Encoder]:
    """Construct `names` with the models they inherit weights from (`init:`), return `names` only."""
    models = {}
    for name in init_order(config, names):  # with the models they inherit weights from
        spec = config.models[name]
        try:
            models[name] = MODELS.get(spec.type)(**spec.args)
        except ConfigError as e:
            raise ConfigError([f"models.{name}.args: {p}" for p in e.problems]) from e
    apply_init(config, models)
    return {name: models[name] for name in names}  # an init-only source is dropped


def build_graph(
    config: Config, cached: Mapping[str, Callable[[list[str]], Tensor]] | None = None
) -> KnowledgeGraph:
    """Load each needed model once and bind every edge's loss to its nodes.

    Args:
        config: A validated config.
        cached: Node -> cached-output lookup (`distill.training.cache.store.resolve_cache`); a model whose
            needed nodes are all cached is not loaded.
    """
    problems = load_plugins(list(config.plugins))
    nodes = model_nodes(config, problems)
    catalogue = layer_catalogue(config, problems)
    if problems:
        raise ConfigError(problems)
    cached = dict(cached or {})
    models = load_models(config, models_to_load(config, cached))
    edges = []
    for name, spec in config.edges.items():
        cls = LOSSES.get(spec.loss)
        args, schedules = split_scheduled(spec.args, cls, f"edges.{name}.args", [])  # problems: check()'s
        loss = cls(**args)
        slots = cls.slots(len(spec.inputs)) or cls.inputs
        loss.bind(slots)
        binding = bind_inputs(f"edges.{name}", spec, cls, slots, nodes, config, catalogue, set(), problems)
        if binding is None:
            raise ConfigError(problems)
        loss.setup(binding.setup_dims())
        weight = weight_schedule(spec.weight, f"edges.{name}.weight")
        if is_schedule(spec.weight):
            schedules = {"weight": weight, **schedules}
        pairs = binding.pairs if binding.mapped else []
        edges.append(Edge(name, loss, list(spec.inputs), weight(0), spec.enabled, schedules, pairs))
    frozen = [n for n in models if config.models[n].frozen]
    graph = KnowledgeGraph(models, edges, frozen, cached)
    graph.local_loss = config.trainer.local_loss
    graph.cast_frozen({n: config.models[n].precision for n in frozen})
    return graph
