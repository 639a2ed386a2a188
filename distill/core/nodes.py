"""An edge's inputs resolved against the models: embedding nodes, layer nodes, layer maps.

`bind_inputs` checks every input of an edge, one line per problem at the YAML path
(`edges.<edge>.inputs[i]`, `edges.<edge>.layers[k]`), with a did-you-mean: the node name,
for a layer node (`student.text.hidden[2]`, `distill.models.intermediate`) its model, output,
kind and layer index against what the model type declares (`Encoder.layer_outputs`, a
meta-device probe, no weights), and the edge's layer map (`layers: uniform` or
`[[0, 2], [1, 5]]`), expanded to concrete node pairs. The loss's slots must take what they are
given: embeddings where the loss does not declare `reads`, the named layer kinds where it does.

Layer nodes of a frozen teacher are never cached: `distill cache` stores embeddings only
(a ViT-B/16's hidden states are 197 x 768 x 2 bytes = 295.5 KiB per layer and image in fp16,
3.46 MiB for all 12 layers, against 1 KiB for its 512-d embedding; docs/architecture.md), so
`cache.mode: require` with a teacher's layer node is refused here and `auto` runs that teacher
live.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from distill.config.schema import Config
from distill.errors import ConfigError
from distill.models.intermediate import KINDS, LayerNode, LayerRead, LayerSpec, parse_node
from distill.registry import LOSSES, MODELS

MAPS = ("uniform",)
Catalogue = dict[str, dict[str, dict[str, LayerSpec]]]
"""Model name -> output -> layer kind -> `LayerSpec`."""
_SPECS: dict[str, dict[str, dict[str, LayerSpec]]] = {}


def _hint(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _key(kind: str, args: dict[str, Any]) -> str:
    """Cache key of a probe: the type, the arguments and the mtime of every path among them."""
    stamps = {v: os.stat(os.path.expanduser(v)).st_mtime_ns for v in args.values()
              if isinstance(v, str) and os.path.exists(os.path.expanduser(v))}
    return json.dumps([kind, args, stamps], sort_keys=True, default=str)


def layer_outputs(kind: str, args: dict[str, Any]) -> dict[str, dict[str, LayerSpec]]:
    """`MODELS[kind].layer_outputs(**args)`, probed once per process and arguments."""
    key = _key(kind, args)
    if key not in _SPECS:
        _SPECS[key] = MODELS.get(kind).layer_outputs(**args)
    return _SPECS[key]


def layer_catalogue(config: Config, problems: list[str]) -> Catalogue:
    """The layer outputs of every model an edge reads a layer node of (no other model is
    probed); a model whose architecture cannot be built is reported at `models.<m>.args`."""
    wanted = dict.fromkeys(node.model for e in config.edges.values() for n in e.inputs if (node := parse_node(n)))
    catalogue: Catalogue = {}
    for name in wanted:
        spec = config.models.get(name)
        if spec is None or spec.type not in MODELS:
            continue  # reported by the node and registry checks
        try:
            catalogue[name] = layer_outputs(spec.type, dict(spec.args))
        except ConfigError as e:
            problems.extend(f"models.{name}.args: {p}" for p in e.problems)
        except TypeError:
            continue  # bad arguments: reported against the signature
    return catalogue


@dataclass
class Binding:
    """An edge's inputs resolved: per layer pair (one for an edge without a layer map), the
    concrete node of each slot, its width, and the `LayerRead` of each layer-node slot."""

    pairs: list[list[str]] = field(default_factory=list)
    widths: list[dict[str, int]] = field(default_factory=list)
    reads: list[dict[str, LayerRead]] = field(default_factory=list)
    mapped: bool = False

    def setup_dims(self) -> dict[str, Any]:
        """What `EdgeLoss.setup` receives: slot -> width, or with a layer map slot -> one width per pair."""
        if not self.mapped:
            return self.widths[0]
        return {slot: tuple(w[slot] for w in self.widths) for slot in self.widths[0]}


def _layer_spec(path: str, node: LayerNode, name: str, config: Config, catalogue: Catalogue,
                problems: list[str]) -> LayerSpec | None:
    """The spec behind a layer node's model, output and kind, or None after a problem."""
    if node.model not in config.models:
        problems.append(f"{path}: unknown model {node.model!r} in node {name!r}; "
                        f"{_hint(node.model, list(config.models))}models: {', '.join(config.models)}")
        return None
    if node.model not in catalogue:
        return None  # its own problem is reported at models.<m>
    outputs = catalogue[node.model]
    kind = config.models[node.model].type
    if not outputs:
        problems.append(f"{path}: model {node.model!r} ({kind}) has no layer nodes: it is no stack of layers; "
                        f"read its embeddings ({node.model}.image / {node.model}.text)")
        return None
    if node.output not in outputs:
        why = (": a pair's states exist per scored pair, not per batch row" if node.output == "pair" else "")
        problems.append(f"{path}: {node.model!r} has no layer outputs for {node.output!r}{why}; "
                        f"{_hint(node.output, list(outputs))}layer outputs: {', '.join(outputs)}")
        return None
    if node.kind not in KINDS:
        problems.append(f"{path}: unknown layer kind {node.kind!r} in {name!r}; "
                        f"{_hint(node.kind, list(KINDS))}kinds: {', '.join(KINDS)}")
        return None
    spec = outputs[node.output][node.kind]
    if spec.reason:
        offered = [k for k, s in outputs[node.output].items() if not s.reason]
        problems.append(f"{path}: {name!r}: {spec.reason}; {node.model}.{node.output} offers {', '.join(offered)}")
        return None
    return spec


def _range(count: int) -> str:
    return f"0..{count - 1}, or -{count}..-1"


def expand_map(path: str, layers: Any, specs: list[LayerSpec], bases: list[str], problems: list[str]) -> list[list[int]]:
    """The layer map `layers` as one list of layer indices (one per input) per pair."""
    counts = [s.count for s in specs]
    if isinstance(layers, str):
        if layers not in MAPS:
            problems.append(f"{path}: unknown layer map {layers!r}; {_hint(layers, list(MAPS))}a map is "
                            "'uniform' or a list of index lists, one index per input ([[0, 2], [1, 5]])")
            return []
        if len(counts) != 2:
            problems.append(f"{path}: 'uniform' maps two inputs; this edge has {len(counts)}: list the pairs instead")
            return []
        m, n = counts
        if m > n:
            problems.append(f"{path}: 'uniform' gives each of {bases[0]}'s {m} layers one of {bases[1]}'s, "
                            f"which has only {n}; list the pairs instead")
            return []
        return [[i, (i + 1) * n // m - 1] for i in range(m)]
    if not isinstance(layers, list | tuple) or not layers:
        problems.append(f"{path}: expected 'uniform' or a non-empty list of index lists ([[0, 2], [1, 5]]), got {layers!r}")
        return []
    pairs = []
    for k, entry in enumerate(layers):
        where = f"{path}[{k}]"
        if not isinstance(entry, list | tuple) or len(entry) != len(counts):
            problems.append(f"{where}: expected {len(counts)} layer indices (one per input), got {entry!r}")
            continue
        pair = []
        for j, (index, count) in enumerate(zip(entry, counts)):
            if not isinstance(index, int) or isinstance(index, bool):
                problems.append(f"{where}[{j}]: a layer index is an integer, got {index!r}")
            elif not -count <= index < count:
                problems.append(f"{where}[{j}]: layer {index} is out of range: {bases[j]} has {count} layers ({_range(count)})")
            else:
                pair.append(index % count)
        if len(pair) == len(counts):
            pairs.append(pair)
    return pairs


def bind_inputs(path: str, edge: Any, cls: type, slots: tuple[str, ...], nodes: dict[str, int], config: Config,
                catalogue: Catalogue, broken: set[str], problems: list[str]) -> Binding | None:
    """An edge's inputs resolved to a `Binding`, or None after reporting its problems.

    Args:
        path: `edges.<edge>`.
        edge: The edge's config.
        cls: Its loss class.
        slots: The loss's slot names for this many inputs.
        nodes: Embedding (and pair) node -> width (`core.check.model_nodes`).
        config: The config.
        catalogue: `layer_catalogue(config, ...)`.
        broken: Models whose own problems are reported already (their nodes are skipped).
    """
    before, unresolved = len(problems), False
    layer: dict[int, tuple[LayerNode, LayerSpec]] = {}
    reads: dict[str, tuple[str, ...]] = dict(getattr(cls, "reads", {}) or {})
    token_losses = ", ".join(n for n in sorted(_token_losses()))
    for i, (slot, name) in enumerate(zip(slots, edge.inputs)):
        where = f"{path}.inputs[{i}]"
        node = parse_node(name)
        if node is None:
            if name in nodes:
                if slot in reads:
                    problems.append(f"{where}: slot {slot!r} of loss {edge.loss!r} takes {'/'.join(reads[slot])} layer "
                                    f"nodes (<model>.<output>.{reads[slot][0]}[<layer>]); {name!r} is an embedding")
                elif (slot == "pair") != name.endswith(".pair"):  # a fused model's pair scorer is no embedding
                    want = "a fused model's pair node (<model>.pair)" if slot == "pair" else "an embedding node, not a pair scorer"
                    problems.append(f"{where}: slot {slot!r} of loss {edge.loss!r} takes {want}; got {name!r}")
            else:
                unresolved = True
                if name.split(".")[0] not in broken:
                    problems.append(f"{where}: unknown node {name!r}; {_hint(name, list(nodes))}nodes: "
                                    f"{', '.join(sorted(nodes))}")
            continue
        spec = _layer_spec(where, node, name, config, catalogue, problems)
        if spec is None:
            unresolved = True  # a problem of its own, or of its model (reported at models.<m>)
            continue
        if slot not in reads:
            problems.append(f"{where}: slot {slot!r} of loss {edge.loss!r} takes an embedding node; {name!r} is a "
                            f"layer node (token losses read those: {token_losses})")
            continue
        if node.kind not in reads[slot]:
            problems.append(f"{where}: slot {slot!r} of loss {edge.loss!r} takes {'/'.join(reads[slot])} nodes "
                            f"(<model>.<output>.{reads[slot][0]}[<layer>]); got {name!r}")
            continue
        if node.index is None and edge.layers is None:
            problems.append(f"{where}: {name!r} needs a layer index ({name}[0] .. {name}[{spec.count - 1}]) "
                            "or the edge a layer map (layers: uniform, or [[i, j], ...])")
            continue
        if node.index is not None and edge.layers is not None:
            problems.append(f"{where}: the edge's layer map indexes its inputs; write {node.base!r} without [{node.index}]")
            continue
        if node.index is not None and not -spec.count <= node.index < spec.count:
            problems.append(f"{where}: layer {node.index} is out of range: {node.model}.{node.output} has "
                            f"{spec.count} layers ({_range(spec.count)})")
            continue
        if config.cache.mode == "require" and config.models[node.model].frozen:
            shape = spec.shapes[node.index if node.index is not None else -1]
            heads = (shape.heads or 1) if node.kind == "attention" else 1
            size = (shape.positions or 0) * shape.width * heads * 2
            problems.append(f"{where}: {name!r} is a layer node of frozen {node.model!r}, and layer nodes are never "
                            f"cached (up to {size / 1024:.0f} KiB per sample and layer in fp16), so cache.mode=require "
                            "cannot serve it; use cache.mode=auto (the teacher then runs live) or never")
            continue
        layer[i] = (node, spec)
    if unresolved or len(problems) > before:
        return None
    if edge.layers is not None and len(layer) != len(edge.inputs):
        embedding = next(n for i, n in enumerate(edge.inputs) if i not in layer)
        problems.append(f"{path}.layers: a layer map pairs layer nodes; {embedding!r} is an embedding node")
        return None
    if edge.layers is None:
        indices = [[layer[i][0].index if i in layer else None for i in range(len(edge.inputs))]]
    else:
        indices = expand_map(f"{path}.layers", edge.layers, [layer[i][1] for i in range(len(edge.inputs))],
                             [f"{layer[i][0].model}.{layer[i][0].output}" for i in range(len(edge.inputs))], problems)
        if not indices:
            return None
    binding = Binding(mapped=edge.layers is not None)
    for pair in indices:
        names, widths, layer_reads = [], {}, {}
        for i, (slot, name) in enumerate(zip(slots, edge.inputs)):
            if i not in layer:
                names.append(name)
                widths[slot] = nodes[name]
                continue
            node, spec = layer[i]
            index = pair[i] % spec.count
            concrete = node.at(pair[i]) if edge.layers is None else node.at(index)
            shape = spec.shapes[index]
            names.append(concrete)
            widths[slot] = shape.width
            layer_reads[slot] = LayerRead(concrete, node.output, node.kind, index, shape, spec.sequence, spec.dynamic)
        binding.pairs.append(names)
        binding.widths.append(widths)
        binding.reads.append(layer_reads)
    return binding


def _token_losses() -> list[str]:
    return [n for n in LOSSES.names() if getattr(LOSSES.get(n), "reads", None)]


def reads_layers(edge: Any) -> bool:
    """Whether an edge's inputs name layer nodes."""
    return any(parse_node(n) is not None for n in edge.inputs)


def describe_binding(binding: Binding) -> str:
    """`a[0] <- b[1], a[1] <- b[3]` for a layer map (what `distill validate` prints)."""
    return ", ".join(" <- ".join(p) for p in binding.pairs)


__all__ = ["Binding", "Catalogue", "bind_inputs", "describe_binding", "expand_map", "layer_catalogue",
           "layer_outputs", "reads_layers"]
