"""Gradient accumulation: exact for in-batch losses (GradCache) and for per-sample ones."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from distill.batch import Batch
from distill.commands.cli import main
from distill.core.build import build_graph
from distill.core.check import exact_accumulation, load_checked
from distill.core.graph import KnowledgeGraph
from distill.errors import ConfigError
from distill.training.gradcache import accumulate, split_batch

PER_SAMPLE = [  # the tiny graph with its in-batch edges off and two feature edges on
    "edges.si_st.enabled=false", "edges.si_tt.enabled=false", "edges.st_ti_kl.enabled=false",
    "edges.fi.loss=feature", "edges.fi.inputs=[student.image, teacher.image]",
    "edges.ft.loss=feature", "edges.ft.inputs=[student.text, teacher.text]", "edges.ft.args={distance: cosine}",
]


def test_in_batch_edges_accumulate_exactly_and_trainable_pair_nodes_are_refused(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml, ["trainer.accumulate_grad_batches=4"])
    assert exact_accumulation(cfg) == 4  # the loader then yields 4 x data.batch_size rows a step
    assert exact_accumulation(load_checked(tiny_yaml, [*PER_SAMPLE, "trainer.accumulate_grad_batches=4"])) == 1
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches: node student.pair is a trainable "
                                          r"cross-encoder"):
        load_checked(tiny_yaml, ["trainer.accumulate_grad_batches=2", "models.student.type=fusion", "models.student.args=null",
                                 "models.student.args={width: 32, depth: 1, heads: 2, image_size: 32, patch_size: 8}",
                                 "edges.si_tt.enabled=false",
                                 "edges.st_ti_kl.enabled=false", "edges.itm.loss=itm",
                                 "edges.itm.inputs=[student.pair]"])


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
    # why in-batch losses need more: Lightning's recipe gives them a different gradient
    whole, accumulated = grads_whole_vs_accumulated(build_graph(load_checked(tiny_yaml)))
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(whole, accumulated))


def grads(graph: KnowledgeGraph) -> list[torch.Tensor]:
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in graph.parameters() if p.requires_grad]
    graph.zero_grad()
    return out


def test_exact_accumulation_gives_the_big_batchs_gradients(tiny_yaml: Path) -> None:
    """4 x 4 micro-batches = one batch of 16 for the tiny graph's in-batch edges (InfoNCE with
    a learnable temperature, a teacher edge, a column KL): parameters and temperature alike."""
    graph = build_graph(load_checked(tiny_yaml)).train()
    b = batch(graph)
    whole_out = graph(b)
    whole_out["loss"].backward()
    whole = grads(graph)
    out = accumulate(graph, b, 4, lambda t: t.backward())
    accumulated = grads(graph)
    torch.testing.assert_close(out["loss"], whole_out["loss"].detach())
    assert len(whole) == len(accumulated) and any(g.abs().sum() > 0 for g in whole)
    for a, c in zip(whole, accumulated):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)
    assert [len(m) for m in split_batch(b, 3)] == [6, 5, 5]


DROPOUT_STUDENT = [  # a ViT image tower and a BERT text tower, both with dropout, no batch norm
    "models.student.type=dual_encoder", "models.student.args=null",
    "models.student.args={image_model: vit_tiny_patch16_224, image_size: 32, embed_dim: 16, "
    "image_args: {img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, drop_rate: 0.3, "
    "proj_drop_rate: 0.3, attn_drop_rate: 0.3}, text_config: {hidden_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 2, intermediate_size: 64, hidden_dropout_prob: 0.3, attention_probs_dropout_prob: 0.3}}",
]


def test_dropout_is_replayed_so_the_gradients_are_the_big_batchs(tiny_yaml: Path) -> None:
    """With dropout on, the big batch is the 4 micro-batches' forward passes kept in one graph
    (each drawing its own masks); the accumulated step replays exactly those masks."""
    graph = build_graph(load_checked(tiny_yaml, DROPOUT_STUDENT)).train()
    b = batch(graph)
    state = torch.get_rng_state()
    nodes = graph.needed_nodes()
    parts = {n: [] for n in nodes}
    for mb in split_batch(b, 4):
        for n in nodes:
            parts[n].append(graph.encode(n, mb))
    graph.losses_from({n: torch.cat(v) for n, v in parts.items()}, b)["loss"].backward()
    whole = grads(graph)
    torch.set_rng_state(state)
    accumulate(graph, b, 4, lambda t: t.backward())
    accumulated = grads(graph)
    for a, c in zip(whole, accumulated):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    torch.set_rng_state(state)  # without the replay the second pass draws other masks
    with patch("distill.training.gradcache._set_rng_state", lambda s: None):
        accumulate(graph, b, 4, lambda t: t.backward())
    assert any(not torch.allclose(a, c, rtol=1e-3, atol=1e-5) for a, c in zip(whole, grads(graph)))


def test_fit_with_exact_accumulation(tiny_yaml: Path) -> None:
    assert main(["fit", str(tiny_yaml), "trainer.accumulate_grad_batches=2", "trainer.max_steps=2",
                 "trainer.gradient_clip_val=1.0"]) == 0
    ckpt = torch.load(tiny_yaml.parent / "run" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # optimizer steps, each over 2 x 16 rows


def test_fit_with_accumulation(tiny_yaml: Path) -> None:
    args = [*PER_SAMPLE, "trainer.accumulate_grad_batches=2", "trainer.max_steps=2"]
    assert main(["fit", str(tiny_yaml), *args]) == 0
    ckpt = torch.load(tiny_yaml.parent / "run" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # optimizer steps: 4 micro-batches


def ddp_worker(rank: int, port: int, local_loss: bool, queue: object) -> None:
    import os

    import torch.distributed as dist

    from tests.test_ddp import ROWS, full_batch, make_graph, rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        graph = make_graph("infonce")
        graph.local_loss = local_loss
        start = sum(ROWS[:rank])
        out = accumulate(graph, rows(full_batch(), start, start + ROWS[rank]), 2, lambda t: t.backward())
        for p in graph.parameters():  # what DDP's reducer does after the step's backward passes
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= 2
        got = {n: p.grad.numpy() for n, p in graph.named_parameters() if p.grad is not None}
        queue.put((rank, float(out["loss"]), got))  # type: ignore[attr-defined]
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_accumulating_give_the_single_process_gradients(local_loss: bool) -> None:
    """Ranks of 3 and 5 rows, each in 2 micro-batches, image ids shared across ranks."""

    from tests.test_ddp import full_batch, make_graph, spawn

    single = make_graph("infonce")
    expected_loss = single(full_batch())["loss"]
    expected_loss.backward()
    expected = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    results = spawn(ddp_worker, 2, local_loss)
    for rank, loss, got in results:
        assert loss == pytest.approx(float(expected_loss), rel=1e-5)
        assert set(got) == set(expected), rank
        for name, g in expected.items():
            torch.testing.assert_close(torch.from_numpy(got[name]), g, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
