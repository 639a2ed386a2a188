"""`distill validate CONFIG`: check a config (every problem at once) and print its graph."""

from __future__ import annotations

import argparse

from distill.commands._args import config_arguments
from distill.config.schema import Config
from distill.core.build import models_to_load
from distill.core.check import load_checked, model_nodes
from distill.core.graph import split_node
from distill.core.nodes import Binding, bind_inputs, describe_binding, layer_catalogue
from distill.core.schedule import is_schedule, weight_schedule
from distill.models.intermediate import LayerRead, parse_node
from distill.registry import LOSSES


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    print(describe(load_checked(args.config, args.overrides)))
    print("config OK")
    return 0


def describe(config: Config) -> str:
    """Models (which will run), nodes with widths, enabled and disabled edges."""
    nodes = model_nodes(config, [])
    loaded = set(models_to_load(config))
    running = {split_node(n)[0] for e in config.edges.values() if e.enabled for n in e.inputs}
    layered = {n.split(".")[0] for e in config.edges.values() if e.enabled for n in e.inputs if parse_node(n)}
    lines = [f"experiment {config.name!r} -> {config.output_dir}", "models:"]
    for name, m in config.models.items():
        role = "frozen teacher" if m.frozen else "trainable"
        state = "runs in training" if name in running else ("loaded for eval only" if name in loaded else "not loaded")
        if m.frozen and name in layered:
            state += " (live: its layer nodes are never cached)"
        lines.append(f"  {name:<12} {m.type:<14} {role:<15} {state}")
    lines.append("nodes:")
    for node, dim in nodes.items():
        lines.append(f"  {node:<20} dim {dim}")
    bindings = edge_bindings(config, nodes)
    reads = {r.name: r for b in bindings.values() for pair in b.reads for r in pair.values()}
    if reads:
        lines.append("layer nodes (each from its output's own forward pass, only while an enabled edge reads it):")
        for name, r in reads.items():
            lines.append(f"  {name:<28} {layer_shape(r)}")
    for title, flag in (("enabled edges:", True), ("disabled edges:", False)):
        chosen = [(n, e) for n, e in config.edges.items() if e.enabled is flag]
        lines.append(title if chosen else f"{title} none")
        for name, e in chosen:
            weight = weight_schedule(e.weight, f"edges.{name}.weight")
            note = "  (monitored: weight 0, no gradient)" if flag and weight.extremes() == (0, 0) else ""
            shown = weight.describe() if is_schedule(e.weight) else f"{e.weight:<6g}"
            lines.append(f"  {name:<14} {e.loss:<15} w={shown} {' , '.join(e.inputs)}{note}")
            if name in bindings and bindings[name].mapped:
                lines.append(f"  {'':<14} layers {e.layers!r}: {describe_binding(bindings[name])}")
    if config.stages:  # a staged run enables each stage's edges in turn (distill.training.stages)
        lines.append("stages (each enables only its own edges):")
        for i, st in enumerate(config.stages):
            steps = st.max_steps or config.trainer.max_steps
            lines.append(f"  {i} {st.name:<12} {steps:>6} steps  edges {', '.join(st.edges)}; trains {', '.join(st.train)}")
    return "\n".join(lines)


def edge_bindings(config: Config, nodes: dict[str, int]) -> dict[str, Binding]:
    """Edge -> its inputs resolved (layer maps expanded), for a config that checks out."""
    catalogue = layer_catalogue(config, [])
    out = {}
    for name, e in config.edges.items():
        cls = LOSSES.get(e.loss)
        slots = cls.slots(len(e.inputs)) or cls.inputs
        binding = bind_inputs(f"edges.{name}", e, cls, slots, nodes, config, catalogue, set(), [])
        if binding is not None:
            out[name] = binding
    return out


def layer_shape(r: LayerRead) -> str:
    """`(N, L<=40, 128)`, `(N, 4 heads, 17, 17)`: a layer node's value, N rows of the batch."""
    length = f"L<={r.shape.positions}" if r.dynamic else str(r.shape.positions)
    if r.kind == "attention":
        return f"{r.kind:<9} (N, {r.shape.heads} heads, {length}, {length}) probabilities over keys"
    heads = f", {r.shape.heads} heads" if r.kind == "values" else ""
    return f"{r.kind:<9} (N, {length}, {r.shape.width}){heads} + mask of real positions"
