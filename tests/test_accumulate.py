"""Gradient accumulation: refused with in-batch losses, accepted (and exact) with per-sample ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.batch import Batch
from distill.commands.cli import main
from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.core.graph import KnowledgeGraph
from distill.errors import ConfigError

PER_SAMPLE = [  # the tiny graph with its in-batch edges off and two feature edges on
    "edges.si_st.enabled=false", "edges.si_tt.enabled=false", "edges.st_ti_kl.enabled=false",
    "edges.fi.loss=feature", "edges.fi.inputs=[student.image, teacher.image]",
    "edges.ft.loss=feature", "edges.ft.inputs=[student.text, teacher.text]", "edges.ft.args={distance: cosine}",
]


def test_accumulation_is_refused_with_in_batch_losses(tiny_yaml: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_checked(tiny_yaml, ["trainer.accumulate_grad_batches=4"])
    assert e.value.problems == [
        "trainer.accumulate_grad_batches: gradient accumulation would shrink the batch that in-batch "
        "losses compare against (edges si_st, si_tt, st_ti_kl); raise data.batch_size or add devices instead"
    ]
    # one in-batch edge left on is enough to refuse; switched off, it no longer counts
    with pytest.raises(ConfigError, match=r"\(edges si_st\)"):
        load_checked(tiny_yaml, [*PER_SAMPLE, "edges.si_st.enabled=true", "trainer.accumulate_grad_batches=2"])


def batch(graph: KnowledgeGraph, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, model in graph.models.items():
        text = model.text_preprocess()([f"a red circle number {i}" for i in range(n)])
        inputs[name] = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), **text}
    return Batch(keys=[f"{i}/0" for i in range(n)], image_ids=torch.arange(n) // 2, inputs=inputs)


def rows(b: Batch, sl: slice) -> Batch:
    return Batch(b.keys[sl], b.image_ids[sl], {m: {k: v[sl] for k, v in d.items()} for m, d in b.inputs.items()})


def grads_whole_vs_accumulated(graph: KnowledgeGraph) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    b = batch(graph)
    graph(b)["loss"].backward()
    whole = [p.grad.clone() for p in graph.parameters() if p.grad is not None]
    graph.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):  # what Lightning does: loss / 2 per micro-batch
        (graph(rows(b, half))["loss"] / 2).backward()
    return whole, [p.grad.clone() for p in graph.parameters() if p.grad is not None]


def test_per_sample_graphs_accept_accumulation_and_it_equals_the_large_batch(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml, [*PER_SAMPLE, "trainer.accumulate_grad_batches=2"])
    whole, accumulated = grads_whole_vs_accumulated(build_graph(cfg))
    assert whole
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # why in-batch losses are refused: the same recipe gives a different gradient
    whole, accumulated = grads_whole_vs_accumulated(build_graph(load_checked(tiny_yaml)))
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(whole, accumulated))


def test_fit_with_accumulation(tiny_yaml: Path) -> None:
    args = [*PER_SAMPLE, "trainer.accumulate_grad_batches=2", "trainer.max_steps=2"]
    assert main(["fit", str(tiny_yaml), *args]) == 0
    ckpt = torch.load(tiny_yaml.parent / "run" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # optimizer steps: 4 micro-batches
