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
from tests.conftest import shrink

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
        assert_same_gradient(b, a)
    # why in-batch losses need more: Lightning's recipe gives them a different gradient
    whole, accumulated = grads_whole_vs_accumulated(build_graph(load_checked(tiny_yaml)))
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(whole, accumulated))


def grads(graph: KnowledgeGraph) -> list[torch.Tensor]:
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in graph.parameters() if p.requires_grad]
    graph.zero_grad()
    return out


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of a sum taken in another order: an absolute slack of 1e-5
    of the tensor's largest entry (CPUs with other vector units round the same sums apart by
    a few 1e-7 of it), far below what a missing cross-micro-batch term changes."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-9)


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
        assert_same_gradient(c, a)
    assert [len(m) for m in split_batch(b, 3)] == [6, 5, 5]


DROPOUT_STUDENT = [  # a ViT image tower and a BERT text tower, both with dropout, no batch norm
    "models.student.type=dual_encoder", "models.student.args=null",
    "models.student.args={image_model: vit_tiny_patch16_224, image_size: 32, embed_dim: 16, "
    "image_args: {img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, drop_rate: 0.3, "
    "proj_drop_rate: 0.3, attn_drop_rate: 0.3}, text_config: {hidden_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 2, intermediate_size: 64, hidden_dropout_prob: 0.3, attention_probs_dropout_prob: 0.3}}",
]


CONACLIP = Path(__file__).resolve().parent.parent / "experiments" / "conaclip.yaml"


def conaclip_graph(data_root: Path, towers: Path, out: Path) -> KnowledgeGraph:
    """experiments/conaclip.yaml's graph (8 in-batch edges) with the dropout student, seeded."""
    torch.manual_seed(0)
    cfg = load_checked(CONACLIP, [*shrink(CONACLIP, data_root, out, towers), *DROPOUT_STUDENT])
    return build_graph(cfg).train()


def big_batch_with_the_same_masks(graph: KnowledgeGraph, b: Batch, k: int) -> list[torch.Tensor]:
    """The reference: the k micro-batches' forward passes (each drawing its own dropout masks)
    kept in one autograd graph, the losses on their concatenation, one backward."""
    nodes = graph.needed_nodes()
    parts = {n: [] for n in nodes}
    for mb in split_batch(b, k):
        for n in nodes:
            parts[n].append(graph.encode(n, mb))
    graph.losses_from({n: torch.cat(v) for n, v in parts.items()}, b)["loss"].backward()
    return grads(graph)


def test_conaclip_4_x_16_with_dropout_gives_the_gradients_of_one_batch_of_64(
    data_root: Path, tiny_towers: Path, tmp_path: Path,
) -> None:
    """With dropout on, one batch of 64 means the 4 micro-batches' masks; the accumulated step
    replays exactly those masks (and without the replay it would not)."""
    graph = conaclip_graph(data_root, tiny_towers, tmp_path)
    assert len(graph.enabled_edges()) == 8
    b = batch(graph, 64)
    state = torch.get_rng_state()
    whole = big_batch_with_the_same_masks(graph, b, 4)
    torch.set_rng_state(state)
    accumulate(graph, b, 4, lambda t: t.backward())
    accumulated = grads(graph)
    assert any(g.abs().sum() > 0 for g in whole)
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


def ddp_worker(rank: int, port: int, paths: tuple[str, str, str], local_loss: bool, queue: object) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        graph = conaclip_graph(*(Path(p) for p in paths))
        graph.local_loss = local_loss
        b = batch(graph, 64)
        torch.manual_seed(1)  # the same dropout masks as the single process's micro-batches of 16
        for skip in range(2 * rank):
            graph.encode("student.image", split_batch(b, 4)[skip])
            graph.encode("student.text", split_batch(b, 4)[skip])
        mine = rows(b, slice(32 * rank, 32 * rank + 32))
        out = accumulate(graph, mine, 2, lambda t: t.backward())
        for p in graph.parameters():  # what DDP's reducer does after the step's backward passes
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= 2
        queue.put((rank, float(out["loss"]), [g.numpy() for g in grads(graph)]))  # type: ignore[attr-defined]
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_accumulating_give_the_single_process_gradients(
    local_loss: bool, data_root: Path, tiny_towers: Path, tmp_path: Path,
) -> None:
    """The ConaCLIP graph, 64 rows: one process in 4 x 16 against 2 ranks of 2 x 16 each."""
    from tests.test_ddp import spawn

    paths = (str(data_root), str(tiny_towers), str(tmp_path))
    graph = conaclip_graph(data_root, tiny_towers, tmp_path)
    b = batch(graph, 64)
    torch.manual_seed(1)
    expected_loss = float(accumulate(graph, b, 4, lambda t: t.backward())["loss"])
    expected = grads(graph)
    rtol = 1e-4 if local_loss else 1e-5  # local mode sums the rows' terms in another order: float32 rounding
    for rank, loss, got in spawn(ddp_worker, 2, paths, local_loss, timeout=300):
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for g, e in zip(got, expected):
            slack = max(5e-6, rtol * float(e.abs().max()))  # rounding scales with the tensor (see assert_same_gradient)
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=rtol, atol=slack, msg=lambda m, r=rank: f"rank {r}: {m}")
