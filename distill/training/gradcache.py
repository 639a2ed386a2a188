"""Exact gradient accumulation for in-batch edges (GradCache, Gao et al., RepL4NLP 2021).

`trainer.accumulate_grad_batches: K` with an in-batch edge makes one optimizer step out of a
loader batch of K x `data.batch_size` rows, processed as K micro-batches:

1. every node of every micro-batch is encoded without keeping its graph (the torch RNG
   state before each micro-batch is kept, and batch-norm buffers are put back, so the
   second pass below repeats the same dropout masks and updates the statistics once);
2. the graph's losses run once on the concatenated node outputs, as for one batch of
   K x B: every in-batch matrix spans all K micro-batches (and, under DDP, every rank's);
   their gradients with respect to the node outputs (and the losses' own parameters,
   learnable temperatures and projections) are kept;
3. each micro-batch is encoded again with its graph and back-propagated from its slice
   of those gradients, so peak activation memory is one micro-batch's.

The parameter gradients then equal those of the big batch (tests/test_accumulate.py), with
two limits, both of the models and not of the losses: batch normalisation normalises each
micro-batch by its own statistics (towers with LayerNorm only, ViTs and BERTs, are exact),
and a trainable pair node (a cross-encoder that scores pairs inside its loss) has no output
to cache, so such a graph is refused (`exact_problem`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch
from distill.core.graph import KnowledgeGraph


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """`batch` cut into `k` consecutive micro-batches (the first `len % k` one row longer);
    tensors shared between models stay shared within each micro-batch."""
    n = len(batch)
    sizes = [n // k + (i < n % k) for i in range(k)]
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(k) if sizes[i]]
    return [_rows(batch, a, b) for a, b in bounds]


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    cut: dict[int, Tensor] = {}

    def part(t: Tensor) -> Tensor:
        if id(t) not in cut:
            cut[id(t)] = t[start:stop]
        return cut[id(t)]

    return Batch(keys=batch.keys[start:stop], image_ids=part(batch.image_ids),
                 inputs={m: {name: part(t) for name, t in d.items()} for m, d in batch.inputs.items()},
                 views=None if batch.views is None else part(batch.views))


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _set_rng_state(state: tuple[Tensor, list[Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _restore(module: nn.Module, saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(saved[k])


def trainable_nodes(graph: KnowledgeGraph, nodes: list[str]) -> list[str]:
    """The nodes whose outputs carry gradients (a trainable model's, not read from a cache)."""
    return [n for n in nodes if n.split(".", 1)[0] not in graph.frozen and n not in graph.cached]


def exact_problem(graph: KnowledgeGraph) -> str | None:
    """Why this graph cannot be accumulated exactly, or None."""
    pairs = [n for n in trainable_nodes(graph, graph.needed_nodes()) if n.endswith(".pair")]
    if pairs:
        return (f"node {pairs[0]} is a trainable cross-encoder that scores pairs inside its loss: it has no "
                "output to cache per micro-batch; use data.batch_size or more devices instead")
    return None


def accumulate(graph: KnowledgeGraph, batch: Batch, k: int, backward: Callable[[Tensor], Any],
               stop: Callable[[dict[str, Tensor]], bool] = lambda out: False) -> dict[str, Tensor]:
    """One exact accumulated step over `batch` in `k` micro-batches (see the module docstring).

    Args:
        graph: The knowledge graph, in training mode.
        batch: The loader batch of K x B rows.
        k: Number of micro-batches.
        backward: Runs backward of a scalar (`LightningModule.manual_backward`).
        stop: Called with the losses before any backward; True skips the backward passes
            (the non-finite guard).

    Returns:
        The graph's outputs (`loss`, `edge/<name>`) of the whole batch, as `graph(batch)` gives.
    """
    micro = split_batch(batch, k)
    nodes = graph.needed_nodes()
    trainable = trainable_nodes(graph, nodes)
    models = [graph.models[m] for m in dict.fromkeys(n.split(".", 1)[0] for n in trainable)]
    tensors = [n for n in nodes if not n.endswith(".pair")]
    states, parts = [], {n: [] for n in tensors}
    for mb in micro:
        states.append(_rng_state())
        saved = [_buffers(m) for m in models]
        with torch.no_grad():
            for n in tensors:
                parts[n].append(graph.encode(n, mb))
        for m, s in zip(models, saved):
            _restore(m, s)
    after = _rng_state()
    local = {n: torch.cat(parts[n]).detach().requires_grad_(n in trainable) for n in tensors}
    with torch.no_grad():  # a frozen pair scorer scores its pairs lazily, on the whole batch
        local.update({n: graph.encode(n, batch) for n in nodes if n.endswith(".pair")})
    out = graph.losses_from(local, batch)
    if stop(out):
        _set_rng_state(after)
        return out
    params = [p for p in graph.losses.parameters() if p.requires_grad]
    leaves = [local[n] for n in trainable]
    grads = torch.autograd.grad(out["loss"], leaves + params, allow_unused=True)
    node_grads, param_grads = grads[: len(leaves)], grads[len(leaves):]
    start = 0
    for i, mb in enumerate(micro):
        _set_rng_state(states[i])
        rows = slice(start, start + len(mb))
        terms = [(graph.encode(n, mb) * g[rows]).sum() for n, g in zip(trainable, node_grads) if g is not None]
        if i == len(micro) - 1:  # the losses' own parameters join the last pass (one backward each)
            terms += [(p * g).sum() for p, g in zip(params, param_grads) if g is not None]
        if terms:
            backward(torch.stack(terms).sum())
        start = rows.stop
    _set_rng_state(after)
    return {key: value.detach() for key, value in out.items()}

