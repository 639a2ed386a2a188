"""The one place that turns a validated `Config` into modules (models, losses, graph)."""

from __future__ import annotations

from distill.config import Config
from distill.errors import ConfigError
from distill.graph import Edge, KnowledgeGraph, split_node
from distill.registry import LOSSES, MODELS
from distill.validate import load_plugins, model_nodes


def models_to_load(config: Config) -> list[str]:
    """Models read by an enabled edge, plus the evaluated model; others are never loaded."""
    names = [split_node(n)[0] for e in config.edges.values() if e.enabled for n in e.inputs]
    names.append(config.eval.model)
    names.extend(config.save_pretrained)
    return [m for m in dict.fromkeys(names) if m in config.models]


def build_graph(config: Config) -> KnowledgeGraph:
    """Load each needed model once and bind every edge's loss to its nodes."""
    problems = load_plugins(list(config.plugins))
    nodes = model_nodes(config, problems)
    if problems:
        raise ConfigError(problems)
    models = {}
    for name in models_to_load(config):
        spec = config.models[name]
        try:
            models[name] = MODELS.get(spec.type)(**spec.args)
        except ConfigError as e:
            raise ConfigError([f"models.{name}.args: {p}" for p in e.problems]) from e
    edges = []
    for name, spec in config.edges.items():
        loss = LOSSES.get(spec.loss)(**spec.args)
        loss.setup({slot: nodes[n] for slot, n in zip(loss.inputs, spec.inputs)})
        edges.append(Edge(name, loss, list(spec.inputs), spec.weight, spec.enabled))
    frozen = [n for n in models if config.models[n].frozen]
    graph = KnowledgeGraph(models, edges, frozen)
    graph.cast_frozen({n: config.models[n].precision for n in frozen})
    return graph
