"""`trainer.local_loss`: each rank computes only its rows of the in-batch losses, with the
gradients and logged values of single-process training on the concatenated batch.

The DDP tests spawn 2 and 3 gloo processes once each (module-scoped fixture) and run every
case in both modes there; the cases cover every registered loss that declares
`global_batch` (checked by `test_every_in_batch_loss_is_covered`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import distill.losses  # noqa: F401  (registers the losses)
from distill.batch import Batch
from distill.core.graph import Edge, KnowledgeGraph
from distill.losses.base import EdgeContext
from distill.registry import LOSSES
from tests.test_ddp import D_IN, VOCAB, LinearDual

DIMS = {"student": 8, "teacher": 6, "teacher2": 5, "teacher3": 7}
# unequal local batches; two captions of one image on different ranks (ids 2, 6, 0) and on
# one rank (id 4 for two ranks)
LAYOUTS = {
    2: ([3, 5], [0, 1, 2, 2, 3, 4, 4, 0]),
    3: ([3, 5, 4], [0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8, 0]),
}
SI, ST, TI, TT = "student.image", "student.text", "teacher.image", "teacher.text"
CASES: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "infonce_fixed": ("infonce", [SI, ST], {"temperature": 0.1}),
    "infonce_learnable": ("infonce", [SI, ST], {"temperature": 0.1, "learnable": True}),
    "infonce_projected": ("infonce", [SI, TT], {"temperature": 0.1, "learnable": True}),  # 8 -> 6 wide
    "triplet_hardest": ("triplet", [SI, ST], {"margin": 0.2}),
    "triplet_sum": ("triplet", [SI, ST], {"margin": 0.2, "hardest": False}),
    "similarity_kl_rows": ("similarity_kl", [SI, ST, TI, TT], {"student_temperature": 0.2, "columns": False}),
    "similarity_kl_columns": ("similarity_kl", [SI, ST, TI, TT], {"student_temperature": 0.2, "columns": True}),
    "similarity_kl_exclude_self": ("similarity_kl", [SI, SI, TI, TI], {"exclude_self": True}),
    "similarity_mse": ("similarity_mse", [SI, ST, TI, TT], {"scale": 2.0}),
    "siglip": ("siglip", [SI, ST], {}),
    "sigmoid_kd": ("sigmoid_kd", [SI, ST, TI, TT], {"learnable": True, "teacher_scale": 5.0}),
    "similarity_kl_ensemble": (
        "similarity_kl_ensemble",
        [SI, ST, TI, TT, "teacher2.image", "teacher2.text"],
        {"teacher_temperatures": [0.05, 0.1], "teacher_weights": [0.7, 0.3]},
    ),
    "similarity_kl_ensemble_exclude_self": (
        "similarity_kl_ensemble",
        [SI, SI, TI, TI, "teacher2.image", "teacher2.image"],
        {"exclude_self": True, "columns": False},
    ),
    "similarity_kl_ensemble_3": (
        "similarity_kl_ensemble",
        [SI, ST, TI, TT, "teacher2.image", "teacher2.text", "teacher3.image", "teacher3.text"],
        {"teacher_weights": [0.5, 0.3, 0.2]},
    ),
    # N teachers through the loss's own name (distill.losses.ensemble), per-teacher arguments
    "similarity_kl_3": (
        "similarity_kl",
        [SI, ST, TI, TT, "teacher2.image", "teacher2.text", "teacher3.image", "teacher3.text"],
        {"teacher_temperature": [0.05, 0.1, 0.2], "teacher_weights": [2.0, 1.0, 1.0], "exclude_self": True},
    ),
    "similarity_mse_3": (
        "similarity_mse",
        [SI, SI, TI, TI, "teacher2.image", "teacher2.image", "teacher3.text", "teacher3.text"],
        {"scale": 2.0, "teacher_weights": [0.5, 0.3, 0.2]},
    ),
    "sigmoid_kd_3": (
        "sigmoid_kd",
        [SI, ST, TI, TT, "teacher2.image", "teacher2.text", "teacher3.image", "teacher3.text"],
        {"learnable": True, "teacher_scale": [5.0, 10.0, 8.0], "teacher_bias": [-3.0, -10.0, -6.0],
         "teacher_weights": [1.0, 2.0, 1.0]},
    ),
}
MODES = ("full", "local")
LEARNABLE = {"infonce_learnable", "infonce_projected", "siglip", "sigmoid_kd", "sigmoid_kd_3"}
"""Cases with a loss parameter (temperature, bias or projection) whose gradient is compared too."""


def make_graph(case: str, local_loss: bool) -> KnowledgeGraph:
    name, inputs, args = CASES[case]
    torch.manual_seed(0)  # a projection's initialisation
    loss = LOSSES.get(name)(**args)
    loss.bind(type(loss).slots(len(inputs)))  # the number of teachers of an ensemble
    loss.setup({slot: DIMS[node.split(".")[0]] for slot, node in zip(loss.inputs, inputs)})
    models = {m: LinearDual(d, seed=i + 1) for i, (m, d) in enumerate(DIMS.items())}
    graph = KnowledgeGraph(models, [Edge("e", loss, inputs, weight=0.7)], frozen=["teacher", "teacher2", "teacher3"])
    graph.local_loss = local_loss
    return graph


def full_batch(image_ids: list[int]) -> Batch:
    g = torch.Generator().manual_seed(0)
    n = len(image_ids)
    inputs = {"pixel_values": torch.randn(n, D_IN, generator=g), "input_ids": torch.randint(0, VOCAB, (n, 6), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return Batch(keys=[str(i) for i in range(n)], image_ids=torch.tensor(image_ids),
                 inputs={m: inputs for m in DIMS})  # fmt: skip


def rows(batch: Batch, start: int, stop: int) -> Batch:
    inputs = {m: {k: v[start:stop] for k, v in d.items()} for m, d in batch.inputs.items()}
    return Batch(keys=batch.keys[start:stop], image_ids=batch.image_ids[start:stop], inputs=inputs)


def grads(graph: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in graph.named_parameters() if p.grad is not None}


def step(graph: nn.Module, batch: Batch) -> tuple[float, float, dict[str, Tensor]]:
    """(total loss, edge value, parameter gradients) of one forward and backward."""
    out = graph(batch)
    out["loss"].backward()
    return float(out["loss"].detach()), float(out["edge/e"]), grads(graph)


def record_rows(seen: list[slice | None], module: nn.Module, args: tuple, kwargs: dict) -> None:
    seen.append(kwargs["ctx"].rows)


def worker(rank: int, world: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes, ids = LAYOUTS[world]
        start = sum(sizes[:rank])
        batch = rows(full_batch(ids), start, start + sizes[rank])
        results = {}
        for case in CASES:
            for mode in MODES:
                graph = make_graph(case, local_loss=mode == "local")
                seen: list[slice | None] = []  # the rows each loss call computed
                graph.losses["e"].register_forward_pre_hook(partial(record_rows, seen), with_kwargs=True)
                ddp = nn.parallel.DistributedDataParallel(graph, find_unused_parameters=True)
                loss, edge, g = step(ddp, batch)
                g = {k.removeprefix("module."): v.numpy() for k, v in g.items()}
                results[case, mode] = (loss, edge, g, [(r.start, r.stop) if r else None for r in seen])
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results() -> dict[int, dict[int, dict]]:
    """World size -> rank -> (case, mode) -> (loss, edge value, gradients, rows each loss call computed)."""
    found = {}
    ctx = mp.get_context("spawn")
    for world in LAYOUTS:
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        found[world] = got
    return found


@pytest.mark.ddp
@pytest.mark.parametrize("world", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_local_and_full_modes_match_single_process(ddp_results: dict, case: str, world: int) -> None:
    loss, edge, expected = step(make_graph(case, local_loss=False), full_batch(LAYOUTS[world][1]))
    assert any(k.startswith("losses.") for k in expected) == (case in LEARNABLE)
    sizes = LAYOUTS[world][0]
    for rank, results in ddp_results[world].items():
        for mode in MODES:
            got_loss, got_edge, got, seen = results[case, mode]
            where = f"{mode} mode, rank {rank} of {world}"
            start = sum(sizes[:rank])
            assert seen == [(start, start + sizes[rank]) if mode == "local" else None], where
            assert got_edge == pytest.approx(edge, rel=1e-5), where
            assert got_loss == pytest.approx(loss, rel=1e-5), where
            assert set(got) == set(expected), where
            for name, g in expected.items():
                torch.testing.assert_close(torch.from_numpy(got[name]), g, rtol=1e-5, atol=1e-7, msg=f"{where}: {name}")


# --------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------


def test_every_in_batch_loss_is_covered() -> None:
    in_batch = {n for n in LOSSES.names() if LOSSES.get(n).global_batch}
    assert in_batch <= {name for name, _, _ in CASES.values()}, "add a case for each new in-batch loss"
    assert all(LOSSES.get(n).local_loss for n in in_batch), "every built-in in-batch loss supports local mode"


@pytest.mark.parametrize("case", list(CASES))
def test_shares_of_a_row_partition_sum_to_the_loss(case: str) -> None:
    """The loss's own contract: its values for rows [0,3), [3,8), [8,12) sum to the whole
    batch's, and so do the gradients (of inputs and loss parameters)."""
    graph = make_graph(case, local_loss=False)
    batch = full_batch(LAYOUTS[3][1])
    loss = graph.losses["e"]
    inputs = graph.edges["e"].inputs
    xs = [graph.encode(n, batch).detach().requires_grad_(n.startswith("student.")) for n in inputs]
    leaves = [*(x for x in xs if x.requires_grad), *loss.parameters()]
    ctx = EdgeContext(image_ids=batch.image_ids)
    whole = loss(*xs, ctx=ctx)
    expected = torch.autograd.grad(whole, leaves)
    shares = [loss(*xs, ctx=replace(ctx, rows=slice(a, b))) for a, b in [(0, 3), (3, 8), (8, 12)]]
    got = torch.autograd.grad(sum(shares), leaves)
    assert float(sum(shares).detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["infonce_learnable", "similarity_kl_exclude_self", "sigmoid_kd", "sigmoid_kd_3"])
def test_local_mode_on_one_process_is_full_mode(case: str) -> None:
    batch = full_batch(LAYOUTS[2][1])
    full = step(make_graph(case, local_loss=False), batch)
    local = step(make_graph(case, local_loss=True), batch)
    assert full[:2] == local[:2]
    assert full[2].keys() == local[2].keys()
    assert all(torch.equal(full[2][k], local[2][k]) for k in full[2])


def test_the_yaml_switch_reaches_the_graph(tiny_yaml: Path) -> None:
    from distill.config.load import load_config
    from distill.core.build import build_graph
    from distill.core.check import field_problems

    assert build_graph(load_config(tiny_yaml)).local_loss is False
    config = load_config(tiny_yaml, ["trainer.local_loss=true"])
    assert config.trainer.local_loss is True and not field_problems(config)
    assert build_graph(config).local_loss is True
