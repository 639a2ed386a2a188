"""Every index kind at 100K and 1M images: query latency, recall@10 against exact float32,
size on disk and in memory, build time, and the exact kinds against the memory bandwidth.

Usage, from the repository root (about 10 minutes on this 2-core machine, most of it the 1M builds):
    PYTHONPATH=. python benchmarks/index_kinds.py [--model EXPORT_OR_CKPT] [--sizes 100000 1000000]
        [--queries 200] [--repeats 2] [--threads 1]

Rows: the real embeddings of 100K distinct generated scenes (`query_latency.py`'s index,
`runs/bench/query_latency-100000.idx`, built once by the same model), and for larger sizes
those 100K followed by synthetic rows drawn from their distribution (`synthetic_rows`: a
Gaussian mixture fit on the real rows, 256 k-means clusters, each with its own mean and full
covariance, L2-normalised): rendering and embedding 1M scenes would take about 40 minutes here.

Queries: `--queries` captions of other scenes (seed 8), each encoded by the exported student
and searched for the top 10, `--repeats` passes: the calls `distill search` makes, on
`--threads` threads (torch, onnxruntime and FAISS alike). Recall@10 is the share of the exact
float32 top 10 found. For each kind the default parameters (chosen from the size) are timed
end to end (tokenize + encode + search); the query knobs (`nprobe`, `rerank`, `ef_search`) are
swept on the encoded queries. Size on disk is the index file; in memory, what the search holds
(rows or codes, lists or graph, buffers) and the process's anonymous-memory growth on loading
it. The bandwidth bound of an exact kind is the bytes it reads per query over the measured
copy bandwidth (STREAM convention: bytes read + written per second, one thread). RSUM: the
embedded benchmark's test split with its image embeddings stored as each dtype.
Writes benchmarks/results/index_kinds.json; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, ROOT, status_kib, write
from query_latency import CHECKPOINT, EXPORT, get_index, queries, stats

from distill.deploy.embedders import load_embedder, resolve_spec
from distill.deploy.index_ann import require_faiss
from distill.deploy.index_exact import dequantize, encode
from distill.deploy.index_kinds import choose_kind
from distill.deploy.search_index import SearchIndex, rebuild_index, save_search_index
from distill.eval.retrieval import retrieval_metrics

SWEEPS = {"ivf_flat": [{"nprobe": p} for p in (8, 16, 32, 64, 128)],
          "ivf_pq": [{"nprobe": p, "rerank": r} for p in (16, 32, 64) for r in (0, 100, 200)],
          "hnsw": [{"ef_search": e} for e in (16, 32, 64, 128, 256)]}  # fmt: skip
VARIANTS = [  # name, rebuild_index options, open options
    ("exact float32", {"kind": "exact", "dtype": "float32"}, {}),
    ("exact float32 (faiss)", {"kind": "exact", "dtype": "float32", "backend": "faiss"}, {}),
    ("exact float16", {"kind": "exact", "dtype": "float16"}, {}),
    ("exact float16 (faiss)", {"kind": "exact", "dtype": "float16", "backend": "faiss"}, {}),
    ("exact int8", {"kind": "exact", "dtype": "int8"}, {}),
    ("exact int8 (faiss)", {"kind": "exact", "dtype": "int8", "backend": "faiss"}, {}),
    ("ivf_flat", {"kind": "ivf_flat"}, {}),
    ("ivf_pq", {"kind": "ivf_pq"}, {}),
    ("hnsw", {"kind": "hnsw"}, {}),
]


def bandwidth(mib: int = 512, repeats: int = 10) -> dict[str, float]:
    """Copy and read bandwidth of one thread, GB/s (1e9 bytes): median of `repeats`."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t)
    nbytes = src.numel() * 4
    return {"copy_gbs": round(2 * nbytes / statistics.median(copy) / 1e9, 2), "read_gbs": round(nbytes / statistics.median(read) / 1e9, 2)}


def synthetic_rows(real: torch.Tensor, n: int, *, clusters: int = 256, seed: int = 0) -> torch.Tensor:
    """n unit rows from a Gaussian mixture fit on `real`: k-means clusters (FAISS), each with its
    mean and full covariance (shrunk 10% toward the pooled within-cluster covariance), drawn in
    proportion to the cluster sizes, then L2-normalised."""
    faiss = require_faiss("synthetic rows")
    x = real.numpy()
    kmeans = faiss.Kmeans(x.shape[1], clusters, niter=20, seed=seed, spherical=True)
    kmeans.train(x)
    assign = torch.from_numpy(kmeans.index.search(x, 1)[1][:, 0])
    centred = real - torch.from_numpy(kmeans.centroids)[assign]
    pooled = centred.t() @ centred / len(real)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.bincount(assign, minlength=clusters).float()
    counts = torch.bincount(torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=gen), minlength=clusters)
    parts = []
    for c in range(clusters):
        members = real[assign == c]
        if counts[c] == 0 or len(members) == 0:
            continue
        cov = pooled if len(members) < 2 else 0.9 * torch.cov(members.t()) + 0.1 * pooled
        chol = torch.linalg.cholesky(cov.double() + 1e-8 * torch.eye(len(cov), dtype=torch.float64)).float()
        parts.append(members.mean(0) + torch.randn(int(counts[c]), real.shape[1], generator=gen) @ chol.t())
    rows = torch.cat(parts)[torch.randperm(n, generator=gen)]
    return torch.nn.functional.normalize(rows, dim=1)


def base_fields(n: int, model: str) -> dict[str, Any]:
    """The non-search fields of an index of n rows (ids only)."""
    return {"version": 2, "kind": "distill-search-index", "model": model, "embedder": "benchmark", "embed_dim": 0,
            "backend": "exact", "sources": ["benchmark"], "ids": [f"{i:07d}" for i in range(n)], "locations": [""] * n,
            "captions": [""] * n, "thumbs": torch.zeros(0, dtype=torch.uint8),
            "thumb_offsets": torch.zeros(n + 1, dtype=torch.int64), "skipped": {}}  # fmt: skip


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)])), 4)


def measure(index: SearchIndex, embedder: Any, texts: list[str], vectors: torch.Tensor, truth: np.ndarray,
            repeats: int) -> dict[str, Any]:  # fmt: skip
    """End to end (encode + search) with the index's own parameters, then each sweep setting."""
    for v in vectors[:20]:  # warm-up
        index.search(v, 10)
    encode_ms, search_ms, total_ms, found = [], [], [], []
    for r in range(repeats):
        for text in texts:
            t0 = time.perf_counter()
            vector = embedder.encode_texts([text])[0]
            t1 = time.perf_counter()
            _, top = index.search(vector, 10)
            t2 = time.perf_counter()
            encode_ms.append((t1 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
            if r == 0:
                found.append(top)
    out = {"params": index.describe(), "recall10": recall(found, truth), "encode_ms": stats(encode_ms),
           "search_ms": stats(search_ms), "total_ms": stats(total_ms), "sweep": []}  # fmt: skip
    for setting in SWEEPS.get(index.kind, []):
        if setting.get("nprobe", 0) > index.engine.params.get("nlist", 1 << 30):
            continue
        index.set_query(**setting)
        times, found = [], []
        for v in vectors:
            t = time.perf_counter()
            found.append(index.search(v, 10)[1])
            times.append((time.perf_counter() - t) * 1e3)
        out["sweep"].append({**setting, "recall10": recall(found, truth), "search_ms": stats(times)})
    return out


def run_size(rows: torch.Tensor, model: str, embedder: Any, texts: list[str], vectors: torch.Tensor, args: argparse.Namespace,
             bw: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """Build, save, load and time every variant over `rows`."""
    n, dim = rows.shape
    truth = torch.cat([(vectors[i : i + 64] @ rows.t()).topk(10, dim=1).indices for i in range(0, len(vectors), 64)]).numpy()
    base = {**base_fields(n, model), "embed_dim": dim}
    folder = ROOT / "runs" / "bench" / "index_kinds"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, build, options in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        load = os.getloadavg()
        require_faiss().omp_set_num_threads(os.cpu_count() or 1)  # builds use every core
        start = time.perf_counter()
        data = rebuild_index(base, rows, **build)
        build_s = time.perf_counter() - start
        path = save_search_index(data, folder / f"{n}-{name.replace(' ', '_').strip('()')}.idx")
        del data
        gc.collect()
        require_faiss().omp_set_num_threads(args.threads)
        before = status_kib("RssAnon")
        start = time.perf_counter()
        index = SearchIndex.open(path, **options)
        load_s = time.perf_counter() - start
        row = {"variant": name, "n": n, "build_s": round(build_s, 2), "load_s": round(load_s, 2),
               "disk_mb": round(path.stat().st_size / 2**20, 1), "memory_mb": round(index.nbytes / 2**20, 1),
               **measure(index, embedder, texts, vectors, truth, args.repeats),
               "rss_growth_mb": round((status_kib("RssAnon") - before) / 1024, 1), "load_avg": [round(x, 2) for x in load]}  # fmt: skip
        if index.kind == "exact":
            read = n * dim * {"float32": 4, "float16": 2, "int8": 1}[index.dtype]
            row["bytes_per_query"] = read
            row["bound_ms"] = round(read / (bw["copy_gbs"] * 1e9) * 1e3, 2)
            row["x_bound"] = round(row["search_ms"]["median"] / row["bound_ms"], 2)
        print(f"{n:>9,} {name:<22} recall {row['recall10']:.4f}  search {row['search_ms']['median']:7.3f} ms  "
              f"total {row['total_ms']['median']:7.3f} ms  build {build_s:6.1f} s  disk {row['disk_mb']:7.1f} MB  "
              f"memory {row['memory_mb']:6.1f} MB  load {load[0]:.2f}", flush=True)  # fmt: skip
        out.append(row)
        del index
        gc.collect()
        path.unlink()
    return out


def rsum_by_dtype(model: str) -> dict[str, Any]:
    """R@1/5/10 both ways and RSUM on the embedded test split, image embeddings stored as each dtype."""
    from distill.deploy.parity import eval_items
    from distill.training.checkpoint import load_checkpoint

    split, items = eval_items(load_checkpoint(CHECKPOINT).config, "test")
    embedder = load_embedder(model, threads=1)
    images = torch.from_numpy(embedder.encode_images([im for _, im, _ in items]))
    texts = torch.from_numpy(embedder.encode_texts([c for _, _, caps in items for c in caps]))
    image_ids = torch.tensor([i for i, _, _ in items])
    text_ids = torch.tensor([i for i, _, caps in items for _ in caps])
    out: dict[str, Any] = {"split": split, "images": len(items), "captions": len(texts)}
    for dtype in ("float32", "float16", "int8"):
        stored = dequantize(*encode(images, dtype))
        out[dtype] = {k: round(v, 2) for k, v in retrieval_metrics(stored, image_ids, texts, text_ids).items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="export folder or .ckpt (default: the exported demo student)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--real", type=int, default=100_000, help="real embeddings (generated scenes); the rest synthetic")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end passes over the queries")
    parser.add_argument("--threads", type=int, default=1, help="threads of the query path")
    parser.add_argument("--variants", nargs="+", default=None, choices=[v[0] for v in VARIANTS], metavar="VARIANT",
                        help=f"only these ({', '.join(repr(v[0]) for v in VARIANTS)})")
    parser.add_argument("--out", type=Path, default=RESULTS / "index_kinds.json")
    args = parser.parse_args()
    model = args.model or str(EXPORT if (EXPORT / "manifest.json").is_file() else CHECKPOINT)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    bw = bandwidth()
    print(f"bandwidth, 1 thread: copy {bw['copy_gbs']} GB/s, read {bw['read_gbs']} GB/s; load {load_start}")
    real = get_index(ROOT / "runs" / "bench" / f"query_latency-{args.real}.idx", model, args.real, False, args.threads).matrix.contiguous()
    rows = real
    if max(args.sizes) > len(real):
        start = time.perf_counter()
        rows = torch.cat([real, synthetic_rows(real, max(args.sizes) - len(real))])
        print(f"{max(args.sizes) - len(real):,} synthetic rows in {time.perf_counter() - start:.0f} s")
    embedder = load_embedder(model, threads=args.threads)
    texts = queries(args.queries)
    vectors = torch.from_numpy(embedder.encode_texts(texts))
    results = []
    for n in args.sizes:
        results += run_size(rows[:n], resolve_spec(model), embedder, texts, vectors, args, bw)
    rsum = rsum_by_dtype(model)
    auto = {}
    for n in args.sizes:  # what `distill index build` picks at this size, end to end
        kind = choose_kind("auto", n, rows.shape[1])[0]
        name = "exact float32" if kind == "exact" else kind
        auto[str(n)] = next(({"variant": name, "recall10": r["recall10"], "total_ms": r["total_ms"]}
                             for r in results if r["n"] == n and r["variant"] == name), None)  # fmt: skip
    result = {"model": resolve_spec(model), "embedder": embedder.describe(), "threads": args.threads,
              "real_rows": len(real), "queries": len(texts), "repeats": args.repeats, "bandwidth": bw,
              "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
              "minutes": round((time.perf_counter() - started) / 60, 1), "auto": auto, "rows": results, "rsum": rsum}  # fmt: skip
    print_tables(result)
    write(result, args.out)


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables docs/deployment.md shows."""
    print("\n| images | index | recall@10 | search median / p90 ms | total median / p90 ms | x bound | build s | disk MB | memory MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        bound = f"{r['x_bound']:.1f}x of {r['bound_ms']:.1f}" if "bound_ms" in r else ""
        print(f"| {r['n']:,} | {r['variant']} ({r['params']}) | {r['recall10']:.4f} | {r['search_ms']['median']:.2f} / "
              f"{r['search_ms']['p90']:.2f} | {r['total_ms']['median']:.2f} / {r['total_ms']['p90']:.2f} | {bound} | "
              f"{r['build_s']:.1f} | {r['disk_mb']:.0f} | {r['memory_mb']:.0f} |")  # fmt: skip
    print("\n| images | index | setting | recall@10 | search median ms |\n|---:|---|---|---:|---:|")
    for r in result["rows"]:
        for s in r["sweep"]:
            setting = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("recall10", "search_ms"))
            print(f"| {r['n']:,} | {r['variant']} | {setting} | {s['recall10']:.4f} | {s['search_ms']['median']:.3f} |")
    for n, a in result["auto"].items():
        if a:
            print(f"\nauto at {int(n):,} images: {a['variant']}, tokenize + encode + search median {a['total_ms']['median']:.2f} ms "
                  f"(p90 {a['total_ms']['p90']:.2f}), recall@10 {a['recall10']:.4f}")  # fmt: skip
    rs = result["rsum"]
    print(f"\n| image embeddings ({rs['images']} test images, {rs['captions']} captions) | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in ("float32", "float16", "int8"):
        m = rs[dtype]
        print(f"| {dtype} | " + " | ".join(f"{m[k]:.2f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")) + " |")


if __name__ == "__main__":
    main()
