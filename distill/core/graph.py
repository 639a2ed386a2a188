"""The knowledge-interaction graph: models are loaded once, nodes are their outputs, edges
are registered losses between nodes. Pure torch (no Lightning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch
from distill.core.schedule import Schedule
from distill.distributed import batch_sizes, gather, rank, sum_over_ranks, world_size
from distill.losses.base import EdgeContext, EdgeLoss
from distill.models.base import Encoder
from distill.models.intermediate import Tokens, parse_node

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Edge:
    """A loss bound to nodes: `inputs` are node names in the loss's slot order."""

    name: str
    loss: EdgeLoss
    inputs: list[str]
    weight: float = 1.0
    enabled: bool = True
    schedules: dict[str, Schedule] = field(default_factory=dict)
    """`weight` and scheduled loss arguments -> their schedule; `KnowledgeGraph.set_step`
    sets `weight` and the loss's arguments to their values at a training step."""
    pairs: list[list[str]] = field(default_factory=list)
    """With a layer map (`layers:`), the concrete layer nodes of each pair in slot order; the
    loss then receives one list per slot, an entry per pair. Empty: `inputs` are the nodes."""

    def nodes(self) -> list[str]:
        """The nodes this edge reads (a layer map's pairs, expanded)."""
        return [n for p in self.pairs for n in p] if self.pairs else list(self.inputs)


def split_node(node: str) -> tuple[str, str]:
    """`"teacher.image"` -> `("teacher", "image")`; a layer node keeps its path
    (`"teacher.text.hidden[2]"` -> `("teacher", "text.hidden[2]")`)."""
    model, _, output = node.partition(".")
    return model, output


class KnowledgeGraph(nn.Module):
    """Runs the nodes that the enabled edges need and sums the weighted edge losses.

    Args:
        models: Model name -> encoder. Frozen models run in eval mode under no_grad.
        edges: The edges, enabled or not (disabled ones keep their parameters so that
            checkpoints do not depend on which edges were switched on).
        frozen: Names of the frozen (teacher) models.
        cached: Node name -> a lookup from a batch (its sample keys and views) to that node's precomputed rows
            (`distill.training.cache`); such nodes are read, not computed, and their model need not
            be in `models`.
    """

    local_loss: bool = False
    """`trainer.local_loss` (set by `distill.core.build.build_graph`): under DDP, losses that
    declare `local_loss` compute only this rank's rows against the gathered batch."""

    def __init__(
        self,
        models: dict[str, Encoder],
        edges: Iterable[Edge],
        frozen: Iterable[str] = (),
        cached: Mapping[str, Callable[[Batch], Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.cached = dict(cached or {})
        self.edges = {e.name: e for e in edges}
        self.losses = nn.ModuleDict({name: e.loss for name, e in self.edges.items()})
        self.frozen = set(frozen)
        for name in self.frozen:
            self.models[name].requires_grad_(False)
        self.set_enabled({n: e.enabled for n, e in self.edges.items()})
        self.set_step(0)

    def set_step(self, step: int) -> dict[str, float]:
        """Move every schedule to training step `step`: scheduled edge weights and loss
        arguments (fixed temperatures) take their values there. The training module calls
        it before each step with Lightning's global step, which a resumed run restores, so
        the schedules continue where they stopped.

        Returns:
            `<weight or argument>/<edge>` -> value, for the enabled edges' scheduled values.
        """
        self.step = step
        values = {}
        for edge in self.edges.values():
            for name, schedule in edge.schedules.items():
                value = schedule(step)
                if name == "weight":
                    edge.weight = value
                else:
                    edge.loss.set_argument(name, value)
                if edge.enabled:
                    values[f"{name}/{edge.name}"] = value
        return values

    def set_enabled(self, enabled: dict[str, bool]) -> None:
        """Switch edges on or off; parameters of losses that are off stop training."""
        for name, on in enabled.items():
            self.edges[name].enabled = on
            self.losses[name].requires_grad_(on)

    def enabled_edges(self) -> list[Edge]:
        """The edges that contribute to the loss, in config order."""
        return [e for e in self.edges.values() if e.enabled]

    def needed_nodes(self) -> list[str]:
        """Nodes read by enabled edges, in first-use order."""
        return list(dict.fromkeys(n for e in self.enabled_edges() for n in e.nodes()))

    def needed_models(self) -> list[str]:
        """Models that run in a training step (a model whose needed nodes are all cached does not)."""
        return list(dict.fromkeys(split_node(n)[0] for n in self.needed_nodes() if n not in self.cached))

    def train(self, mode: bool = True) -> KnowledgeGraph:
        """Train mode for students; frozen teachers always stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            self.models[name].eval()
        return self

    def cast_frozen(self, precision: dict[str, str]) -> None:
        """Store frozen models in a lower precision (`fp16` / `bf16`) to save memory."""
        for name, p in precision.items():
            if name in self.frozen and p != "fp32":
                self.models[name].to(DTYPES[p])

    def encode(self, node: str, batch: Batch) -> Any:
        """Compute one node's output for a batch (teachers under no_grad), or read it from the cache."""
        return self.encode_nodes([node], batch)[node]

    def encode_nodes(self, nodes: Iterable[str], batch: Batch) -> dict[str, Any]:
        """Node -> output for a batch: cached nodes are read; the layer nodes of one model
        output come from the same forward pass as that output (`Encoder.encode_layers`, hooks
        on those layers only); a model output no layer node reads runs as `encode` alone."""
        out: dict[str, Any] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for node in nodes:
            if node in self.cached:
                out[node] = self.cached[node](batch).to(batch.image_ids.device)
                continue
            layer = parse_node(node)
            groups.setdefault((layer.model, layer.output) if layer else split_node(node), []).append(node)
        for (model_name, output), group in groups.items():
            model = self.models[model_name]
            inputs = batch.inputs[model_name]
            frozen = model_name in self.frozen
            if frozen:
                dtype = next(model.parameters(), torch.empty(0)).dtype
                inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            layers = {n: ln for n in group if (ln := parse_node(n)) is not None}
            with torch.no_grad() if frozen else nullcontext():
                if not layers:
                    got = {group[0]: model.encode(output, inputs)}
                else:
                    final, states = model.encode_layers(output, inputs, [(ln.kind, ln.index) for ln in layers.values()])
                    got = {n: states[(ln.kind, ln.index)] for n, ln in layers.items()}
                    got[f"{model_name}.{output}"] = final
            for n in group:  # a pair output (a cross-encoder's scorer over candidate pairs) is not a tensor
                value = got[n]
                out[n] = value.float() if frozen and isinstance(value, Tensor | Tokens) else value
        return out

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Total loss under `"loss"` and each enabled edge's unweighted value under `"edge/<name>"`.

        Losses that declare `global_batch` see every rank's rows (see `distill.distributed`);
        the others see local rows, scaled by W * B_local / B_global so that DDP's gradient
        averaging yields the gradient of the global mean. With `local_loss` under DDP, a loss
        that declares `local_loss` gets the gathered rows with `EdgeContext.rows` = this
        rank's slice and returns this rank's share L_r of the global value; the total trains
        on W x L_r (DDP divides by W again) but reads the global value sum_r L_r (one scalar
        all-reduce per such edge), as do `edge/<name>`, so logs read alike in both modes.
        """
        return self.losses_from(self.encode_nodes(self.needed_nodes(), batch), batch)

    def losses_from(self, local: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """`forward` from node outputs already encoded for `batch` (`distill.training.gradcache`
        encodes them micro-batch by micro-batch)."""
        edges = self.enabled_edges()
        n_local = len(batch)
        distributed = world_size() > 1
        sizes = batch_sizes(n_local, batch.image_ids.device) if distributed else [n_local]
        local_scale = world_size() * n_local / sum(sizes)
        gathered: dict[str, Tensor] = {}

        def global_node(node: str) -> Tensor:
            if node not in gathered:
                trainable = split_node(node)[0] not in self.frozen and node not in self.cached
                gathered[node] = gather(local[node], sizes, with_grad=trainable)
            return gathered[node]

        global_ctx = EdgeContext(image_ids=gather(batch.image_ids, sizes, with_grad=False), keys=batch.keys)
        local_ctx = EdgeContext(image_ids=batch.image_ids, keys=batch.keys)
        start = sum(sizes[: rank()]) if distributed else 0
        rows_ctx = replace(global_ctx, rows=slice(start, start + n_local))
        local_mode = self.local_loss and distributed
        out: dict[str, Tensor] = {}
        total = torch.zeros((), device=batch.image_ids.device)
        for edge in edges:
            if edge.loss.global_batch and local_mode and edge.loss.local_loss:
                share = edge.loss(*[global_node(n) for n in edge.inputs], ctx=rows_ctx)
                value = sum_over_ranks(share)
                scaled = share * world_size()
                contribution = scaled - scaled.detach() + value  # the gradient of W x share, the global value
            elif edge.loss.global_batch:
                value = edge.loss(*[global_node(n) for n in edge.inputs], ctx=global_ctx)
                contribution = value
            elif edge.pairs:  # a layer map: one list per slot, an entry per pair
                value = edge.loss(*[[local[p[i]] for p in edge.pairs] for i in range(len(edge.inputs))], ctx=local_ctx)
                contribution = value * local_scale
            else:
                value = edge.loss(*[local[n] for n in edge.inputs], ctx=local_ctx)
                contribution = value * local_scale
            total = total + edge.weight * contribution
            out[f"edge/{edge.name}"] = value.detach()
        out["loss"] = total
        return out
