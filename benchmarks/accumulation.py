"""Exact accumulation (`trainer.accumulate_grad_batches` with in-batch edges) against one big batch.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/accumulation.py [--micro 16] [--ks 1 2 4 8] [--repeats 5]

The ConaCLIP graph (experiments/conaclip.yaml's edges: 5 InfoNCE, 3 similarity KL) with a
LayerNorm-only student (a 4-block ViT at 64 px + a 2-layer BERT, dropout off so the two ways
can be compared to the bit) and a frozen random teacher of the same kind. For each K, one
optimizer step's gradient over K x `--micro` rows is computed two ways:
- `big`: one forward and backward of the whole batch (`graph(batch)`);
- `accumulated`: `distill.training.gradcache.accumulate` in K micro-batches.

Reported: median step time (interleaved repeats, the ratio measured side by side in one
process), peak resident memory of one step above the memory before it (each way in a fresh
process: Linux `VmHWM` reset through /proc/self/clear_refs, glibc's mmap threshold fixed so
freed tensors leave the process), and the largest absolute gradient difference between the
two ways. Writes benchmarks/results/accumulation.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from _common import RESULTS, experiment, status_kib, write

from distill.batch import Batch
from distill.core.build import build_graph
from distill.core.graph import KnowledgeGraph
from distill.training.gradcache import accumulate

VIT = {"image_model": "vit_tiny_patch16_224", "image_size": 64, "embed_dim": 128,
       "image_args": {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 192, "num_heads": 3},
       "text_config": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 512, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                       "attention_probs_dropout_prob": 0.0}}  # fmt: skip


def graph() -> KnowledgeGraph:
    torch.manual_seed(0)
    cfg = experiment("conaclip", {"student": {"type": "dual_encoder", "args": VIT},
                                  "teacher": {"type": "dual_encoder", "frozen": True, "args": VIT}}, [])
    return build_graph(cfg).train()


def batch(g: KnowledgeGraph, n: int) -> Batch:
    gen = torch.Generator().manual_seed(1)
    text = g.models["student"].text_preprocess()([f"{i % 7} red circles left of a blue square number {i}" for i in range(n)])
    inputs = {"pixel_values": torch.randn(n, 3, 64, 64, generator=gen), **text}
    return Batch(keys=[f"{i}/0" for i in range(n)], image_ids=torch.arange(n) // 2,
                 inputs={"student": inputs, "teacher": inputs})


def step(g: KnowledgeGraph, b: Batch, k: int) -> None:
    if k == 1:
        g(b)["loss"].backward()
    else:
        accumulate(g, b, k, lambda t: t.backward())


def peak_worker(n: int, k: int, queue: Any) -> None:
    torch.set_num_threads(1)
    g = graph()
    b = batch(g, n)
    step(g, b, k)  # warm-up: lazy allocations, autograd buffers
    g.zero_grad(set_to_none=True)
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step(g, b, k)
    queue.put((status_kib("VmHWM") - before) / 1024)


def peak_mib(n: int, k: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=peak_worker, args=(n, k, queue))
    p.start()
    value = queue.get(timeout=600)
    p.join()
    return value


def gradients(g: KnowledgeGraph, b: Batch, k: int) -> list[torch.Tensor]:
    step(g, b, k)
    out = [p.grad.clone() for p in g.parameters() if p.grad is not None]
    g.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=16, help="rows per micro-batch")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at start-up: set before the children spawn
    torch.set_num_threads(1)
    g = graph()
    rows = []
    for k in args.ks:
        n = k * args.micro
        b = batch(g, n)
        big, acc = gradients(g, b, 1), gradients(g, b, k)
        diff = max(float((x - y).abs().max()) for x, y in zip(big, acc))
        scale = max(float(x.abs().max()) for x in big)
        times: dict[str, list[float]] = {"big": [], "accumulated": []}
        for r in range(args.repeats + 1):
            for name in (("big", "accumulated") if r % 2 else ("accumulated", "big")):
                start = time.perf_counter()
                step(g, b, 1 if name == "big" else k)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                g.zero_grad(set_to_none=True)
        t_big, t_acc = statistics.median(times["big"]), statistics.median(times["accumulated"])
        m_big, m_acc = peak_mib(n, 1), peak_mib(n, k)
        rows.append({"k": k, "micro": args.micro, "rows": n, "big_s": t_big, "accumulated_s": t_acc,
                     "time_ratio": t_acc / t_big, "big_peak_mib": m_big, "accumulated_peak_mib": m_acc,
                     "memory_ratio": m_acc / m_big, "max_grad_diff": diff, "max_grad": scale})  # fmt: skip
        r = rows[-1]
        print(f"K={k:2d} x {args.micro} = {n:4d} rows: big {t_big:.3f} s, {m_big:.0f} MiB | accumulated "
              f"{t_acc:.3f} s ({r['time_ratio']:.2f}x), {m_acc:.0f} MiB ({r['memory_ratio']:.2f}x) | "
              f"max |grad diff| {diff:.2e} (max |grad| {scale:.2e})", flush=True)
    print("\n| K x B | rows | big step (s) | accumulated (s) | time ratio | big peak (MiB) | accumulated peak (MiB) "
          "| memory ratio | max abs grad diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} x {r['micro']} | {r['rows']} | {r['big_s']:.3f} | {r['accumulated_s']:.3f} | "
              f"{r['time_ratio']:.2f}x | {r['big_peak_mib']:.0f} | {r['accumulated_peak_mib']:.0f} | "
              f"{r['memory_ratio']:.2f}x | {r['max_grad_diff']:.1e} |")
    write({"rows": rows, "repeats": args.repeats}, RESULTS / "accumulation.json")


if __name__ == "__main__":
    main()
