"""Per-rank peak memory of the ConaCLIP in-batch losses, full vs local (`trainer.local_loss`).

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/local_loss_memory.py [--worlds 1 2 3 4] [--batches 64 256 1024]

The in-batch edges of experiments/conaclip.yaml (5 InfoNCE, 3 similarity KL: E = 8) run
through `KnowledgeGraph` under DDP in W gloo processes on the CPU, for each local batch B
and both modes; one step = forward + backward. The encoders are single linear maps on
128-wide random embeddings (student trained, teacher frozen), so the step's memory is the
losses': their B_global x B_global (full) or B x B_global (local) matrices, the softmax
intermediates that autograd keeps for the backward, and the backward's gradients.

What is measured: each rank's peak resident memory during the step minus its resident
memory just before it (Linux `VmHWM` after resetting it through /proc/self/clear_refs),
with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`) so that every large
tensor is its own mapping, returned to the system when freed; the maximum over ranks is
reported. Beside it, the bytes of the E similarity matrices alone (E x rows x B_global x 4,
rows = B_global in full mode, B in local mode) and the ratio of the two: the number of
matrix-sized float32 buffers the step holds at its peak. A configuration whose full-mode
estimate (that ratio, assumed 6 until measured, times the matrices, over all ranks) exceeds
`--budget-gb` is not run on this shared machine and is reported from the formula instead.
Writes benchmarks/results/local_loss_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import RESULTS, ROOT, status_kib, write
from omegaconf import OmegaConf
from torch import Tensor, nn

import distill.losses  # noqa: F401  (registers the losses)
from distill.batch import Batch
from distill.config.load import load_raw
from distill.core.graph import Edge, KnowledgeGraph
from distill.models.base import Encoder, l2norm
from distill.registry import LOSSES

DIM = 128
ASSUMED_BUFFERS = 6.0
"""Matrix-sized buffers per edge assumed for the skip decision before any measurement."""


class Linear(Encoder):
    """An encoder whose inputs are already embeddings: one linear map per output, normalised."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.maps = nn.ModuleDict({o: nn.Linear(DIM, DIM) for o in self.outputs})
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / DIM**0.5

    def encode(self, output: str, inputs: dict[str, Tensor]) -> Tensor:
        return l2norm(self.maps[output](inputs[output]))


def conaclip_edges() -> list[Edge]:
    """The enabled in-batch edges of experiments/conaclip.yaml, in config order."""
    raw = OmegaConf.to_container(load_raw(ROOT / "experiments" / "conaclip.yaml"), resolve=True)
    edges = []
    for name, spec in raw["edges"].items():  # type: ignore[index, union-attr]
        loss = LOSSES.get(spec["loss"])
        if spec.get("enabled", True) and loss.global_batch:
            edges.append(Edge(name, loss(**spec.get("args", {})), list(spec["inputs"]), spec.get("weight", 1.0)))
    return edges


def measure(graph: nn.Module, batch: Batch) -> tuple[int, float, dict[str, float]]:
    """(peak resident bytes above the start, seconds, edge values) of one forward + backward."""
    gc.collect()
    dist.barrier()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    out = graph(batch)
    out["loss"].backward()
    seconds = time.perf_counter() - start
    peak = (status_kib("VmHWM") - before) * 1024
    values = {k[5:]: float(v) for k, v in out.items() if k.startswith("edge/")}
    del out
    graph.zero_grad(set_to_none=True)
    return peak, seconds, values


def make_batch(rank: int, n: int) -> Batch:
    g = torch.Generator().manual_seed(rank)
    inputs = {m: {o: torch.randn(n, DIM, generator=g) for o in ("image", "text")} for m in ("student", "teacher")}
    ids = torch.arange(rank * n, (rank + 1) * n)
    return Batch(keys=[str(int(i)) for i in ids], image_ids=ids, inputs=inputs)


def worker(rank: int, world: int, port: int, plan: list[tuple[int, str]], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for n, mode in [(8, "full"), *plan]:  # the first step warms up (lazy initialisation)
            torch.manual_seed(0)
            graph = KnowledgeGraph({"student": Linear(1), "teacher": Linear(2)}, conaclip_edges(), frozen=["teacher"])
            graph.local_loss = mode == "local"
            results[n, mode] = measure(nn.parallel.DistributedDataParallel(graph), make_batch(rank, n))
            del graph
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, plan: list[tuple[int, str]]) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, plan, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return got


def matrices(edges: int, world: int, batch: int, mode: str) -> int:
    """Bytes of the E float32 similarity matrices one rank computes."""
    rows = world * batch if mode == "full" else batch
    return 4 * edges * rows * world * batch


def buffers_per_matrix(rows: list[dict[str, Any]], mode: str) -> float | None:
    """Peak over matrix bytes at the mode's largest measured configuration (the least
    diluted by fixed overheads), or None when the mode was not measured."""
    measured = [r for r in rows if r["measured"] and r["mode"] == mode]
    if not measured:
        return None
    top = max(measured, key=lambda r: r["matrix_bytes"])
    return top["peak_bytes"] / top["matrix_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--budget-gb", type=float, default=6.0, help="largest estimated total (all ranks) to run")
    parser.add_argument("--target", type=int, nargs=2, default=[64, 512], metavar=("GPUS", "BATCH"),
                        help="the extrapolation: W and B_local")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "local_loss_memory.json")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at start-up: set before the ranks spawn
    e = len(conaclip_edges())
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for world in args.worlds:
        modes = ["full", "local"] if world > 1 else ["full"]  # one process: local mode is full mode
        plan, skipped = [], []
        for n in args.batches:
            for mode in modes:
                estimate = ASSUMED_BUFFERS * matrices(e, world, n, mode) * world
                (plan if estimate <= args.budget_gb * 2**30 else skipped).append((n, mode))
        got = run_world(world, plan) if plan else {}
        for n, mode in plan:
            peaks = [got[r][n, mode][0] for r in got]
            rows.append({"world": world, "batch_local": n, "batch_global": world * n, "mode": mode, "measured": True,
                         "peak_bytes": max(peaks), "seconds": max(got[r][n, mode][1] for r in got),
                         "matrix_bytes": matrices(e, world, n, mode), "edges": got[0][n, mode][2]})  # fmt: skip
        for n, mode in skipped:
            rows.append({"world": world, "batch_local": n, "batch_global": world * n, "mode": mode, "measured": False,
                         "matrix_bytes": matrices(e, world, n, mode)})  # fmt: skip
    # the same losses in both modes (the logged values are the global ones)
    by = {(r["world"], r["batch_local"], r["mode"]): r for r in rows if r["measured"]}
    agree = all(abs(by[w, n, "local"]["edges"][k] - v) <= 1e-4 * abs(v) + 1e-6
                for (w, n, m), r in by.items() if m == "full" and (w, n, "local") in by
                for k, v in r["edges"].items())  # fmt: skip
    buffers = {m: b for m in ("full", "local") if (b := buffers_per_matrix(rows, m)) is not None}
    for r in rows:
        if not r["measured"]:
            r["peak_bytes_formula"] = int(buffers.get(r["mode"], ASSUMED_BUFFERS) * r["matrix_bytes"])
    w, n = args.target
    target = {m: {"matrix_bytes": matrices(e, w, n, m), "peak_bytes": int(buffers.get(m, ASSUMED_BUFFERS) * matrices(e, w, n, m))}
              for m in ("full", "local")}  # fmt: skip
    result = {"config": {"worlds": args.worlds, "batches": args.batches, "budget_gb": args.budget_gb, "dim": DIM,
                         "edges": e, "threads_per_rank": 1},
              "rows": rows, "buffers_per_matrix": buffers, "same_edge_values": agree,
              "extrapolation": {"world": w, "batch_local": n, **target}, "seconds_total": time.perf_counter() - started}  # fmt: skip

    mib = 2**20
    print(f"{'W':>2} {'B_local':>7} {'B_global':>8} {'mode':>5} {'peak MiB':>9} {'matrices MiB':>12} {'ratio':>6} {'s':>6}")
    for r in sorted(rows, key=lambda r: (r["world"], r["batch_local"], r["mode"])):
        if r["measured"]:
            peak, ratio, sec = f"{r['peak_bytes'] / mib:9.1f}", f"{r['peak_bytes'] / r['matrix_bytes']:6.1f}", f"{r['seconds']:6.2f}"
        else:
            peak, ratio, sec = f"{'~' + format(r['peak_bytes_formula'] / mib, '.0f'):>9}", f"{'':>6}", f"{'(formula)':>6}"
        print(f"{r['world']:>2} {r['batch_local']:>7} {r['batch_global']:>8} {r['mode']:>5} {peak} "
              f"{r['matrix_bytes'] / mib:12.1f} {ratio} {sec}")  # fmt: skip
    print(f"matrix-sized buffers at the peak (largest measured configuration): {', '.join(f'{m} {b:.1f}' for m, b in buffers.items())}; "
          f"same edge values in both modes: {agree}")  # fmt: skip
    for m, t in target.items():
        print(f"W={w} x B={n} ({m}): matrices {t['matrix_bytes'] / 2**30:.2f} GiB, peak ~{t['peak_bytes'] / 2**30:.1f} GiB per rank")
    write(result, args.out)


if __name__ == "__main__":
    main()
