"""Two CPU processes (gloo): gradients equal single-process training on the whole batch."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import distill.losses  # noqa: F401  (registers the losses)
from distill.batch import Batch
from distill.core.graph import Edge, KnowledgeGraph
from distill.models.base import Encoder, l2norm
from distill.registry import LOSSES

pytestmark = pytest.mark.ddp

D_IN, VOCAB = 12, 30
ROWS = [3, 5]  # unequal local batches on purpose
IMAGE_IDS = [0, 1, 1, 2, 3, 4, 4, 5]  # two captions of images 1 and 4


class LinearDual(Encoder):
    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.img = nn.Linear(D_IN, dim)
        self.txt = nn.EmbeddingBag(VOCAB, dim)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64).float()

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(self.img(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return l2norm(self.txt(input_ids))


def make_graph(edge: str) -> KnowledgeGraph:
    specs = {
        "infonce": ([("student.image", "student.text")], {"temperature": 0.1, "learnable": True}),
        "similarity_kl": (
            [("student.image", "student.text", "teacher.image", "teacher.text")],
            {"student_temperature": 0.2, "teacher_temperature": 0.1},
        ),
        "feature": ([("student.image", "teacher.image")], {"distance": "mse"}),
    }
    inputs, args = specs[edge]
    edges = [Edge(f"e{i}", LOSSES.get(edge)(**args), list(ins)) for i, ins in enumerate(inputs)]
    # the task edge too, so that every student parameter gets a gradient
    edges.append(Edge("task", LOSSES.get("infonce")(temperature=0.07), ["student.image", "student.text"], 0.5))
    models = {"student": LinearDual(8, seed=1), "teacher": LinearDual(8, seed=2)}
    return KnowledgeGraph(models, edges, frozen=["teacher"])


def full_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    n = sum(ROWS)
    inputs = {"pixel_values": torch.randn(n, D_IN, generator=g), "input_ids": torch.randint(0, VOCAB, (n, 6), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return Batch(keys=[str(i) for i in range(n)], image_ids=torch.tensor(IMAGE_IDS), inputs={"student": inputs, "teacher": inputs})


def rows(batch: Batch, start: int, stop: int) -> Batch:
    inputs = {m: {k: v[start:stop] for k, v in d.items()} for m, d in batch.inputs.items()}
    return Batch(keys=batch.keys[start:stop], image_ids=batch.image_ids[start:stop], inputs=inputs)


def grads(graph: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in graph.named_parameters() if p.grad is not None}


def worker(rank: int, port: int, edge: str, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        graph = make_graph(edge)
        ddp = nn.parallel.DistributedDataParallel(graph)
        start = sum(ROWS[:rank])
        out = ddp(rows(full_batch(), start, start + ROWS[rank]))
        out["loss"].backward()
        queue.put((rank, float(out["loss"].detach()), {k: v.numpy() for k, v in grads(graph).items()}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target: Any, world: int, *args: Any, port: int | None = None, timeout: float = 120) -> list[Any]:
    """Run `target(rank, port, *args, queue)` in `world` spawned processes; what each queued."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), port or free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("edge", ["infonce", "similarity_kl", "feature"])
def test_two_process_gradients_match_single_process(edge: str) -> None:
    single = make_graph(edge)
    out = single(full_batch())
    out["loss"].backward()
    expected = grads(single)

    results = spawn(worker, 2, edge, port=free_port_once[edge])
    for rank, _loss, got in results:
        assert set(got) == set(expected), rank
        for name, g in expected.items():
            torch.testing.assert_close(torch.from_numpy(got[name]), g, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
    if edge != "feature":  # global losses: every rank computes the global value
        assert all(abs(loss - float(out["loss"].detach())) < 1e-5 for _, loss, _ in results)


free_port_once = {e: free_port() for e in ["infonce", "similarity_kl", "feature"]}
