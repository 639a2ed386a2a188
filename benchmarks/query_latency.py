"""End-to-end text query latency over a 100K-image index: tokenize + encode + top-10.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/query_latency.py [--model EXPORT_OR_CKPT] [--n 100000]
        [--queries 300] [--threads 1] [--faiss]

The index holds real embeddings of `--n` generated images: scenes of the embedded
benchmark's generator (`distill.data.synthetic.make_example`, seed 7, split "train", 64 px;
not the demo's training images), rendered on every core and embedded in batches of 256 by
the model that answers the queries, on `--threads` threads (the scene renderer takes the
other cores). Nothing is tiled or copied: 100K distinct images. Per image on this 2-core
CPU: about 1.5 ms to render (on 2 processes) and 1 ms to decode, preprocess and embed with
the PyTorch student on one thread, so about 2 to 3 minutes for 100K on a quiet machine;
5K took 18 s with the machine fully loaded by a training job. The index is written to `runs/bench/query_latency-<n>.idx` (no thumbnails) and
reused by later runs with the same model and size (`--rebuild` to force).

Model: `--model`, default the exported student `runs/demo/student_distilled/export-student-onnx`
(`distill export runs/demo/student_distilled/final.ckpt --format onnx`) when it exists, else
the checkpoint itself through PyTorch. Queries: `--queries` distinct captions of other
generated scenes (seed 8), each answered `--repeats` times, cycling through all of them
after a warm-up pass; a query is `embedder.encode_texts([text])` then `SearchIndex.search`
for the top 10, the same calls `distill search` and `distill serve` make. Reported: median,
p90 and mean of the encode, search and total times (ms), and the search alone at 1K, 10K
and the full size (row prefixes of the same matrix). `--threads` sets torch's and the
ONNX runtime's intra-op threads (1 by default, as `distill search`/`serve`).
Writes benchmarks/results/query_latency.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from _common import RESULTS, ROOT, write

from distill.data.base import open_rgb
from distill.data.synthetic import _examples, make_example
from distill.deploy.embedders import load_embedder, resolve_spec
from distill.deploy.search_index import (
    SearchIndex,
    index_images,
    load_search_index,
    save_search_index,
)
from distill.deploy.sources import Item, Skipped

CHECKPOINT = ROOT / "runs/demo/student_distilled/final.ckpt"
EXPORT = ROOT / "runs/demo/student_distilled/export-student-onnx"


class GeneratedScenes:
    """`n` generated images as an index source (ids `gen/000000`, first caption kept)."""

    def __init__(self, n: int, seed: int = 7, image_size: int = 64) -> None:
        self.n, self.seed, self.image_size = n, seed, image_size

    def __len__(self) -> int:
        return self.n

    def items(self, skipped: Skipped) -> Iterator[Item]:
        examples = _examples(seed=self.seed, split="train", n=self.n, image_size=self.image_size)
        for i, (jpg, captions) in enumerate(examples):
            yield Item(f"gen/{i:06d}", "", captions[0], open_rgb(jpg))


def queries(n: int, seed: int = 8) -> list[str]:
    """n distinct captions of scenes that are not in the index."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        caption = random.Random(i).choice(make_example(seed=seed, split="val", index=i, image_size=16)[1])
        if caption not in out:
            out.append(caption)
        i += 1
    return out


def stats(ms: list[float]) -> dict[str, float]:
    """Median, p90 and mean of a list of milliseconds, rounded."""
    q = statistics.quantiles(ms, n=10)
    return {"median": round(statistics.median(ms), 3), "p90": round(q[-1], 3), "mean": round(statistics.fmean(ms), 3)}


def get_index(path: Path, model: str, n: int, rebuild: bool, threads: int) -> SearchIndex:
    """The benchmark index: reused when it matches the model and size, else built and saved."""
    if path.is_file() and not rebuild:
        data = load_search_index(path)
        if data["model"] == resolve_spec(model) and len(data["ids"]) == n:
            print(f"reusing {path}")
            return SearchIndex(data)
    start = time.perf_counter()
    embedder = load_embedder(model, threads=threads)
    data, _ = index_images([GeneratedScenes(n)], embedder, model=resolve_spec(model), names=[f"generated:{n}"],
                          batch_size=256, thumb_size=0)  # fmt: skip
    save_search_index(data, path)
    print(f"built {path} in {time.perf_counter() - start:.0f} s")
    return SearchIndex(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="export folder or .ckpt (default: the exported demo student)")
    parser.add_argument("--n", type=int, default=100_000, help="images in the index")
    parser.add_argument("--queries", type=int, default=300, help="distinct query texts")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the query path")
    parser.add_argument("--faiss", action="store_true", help="search with FAISS IndexFlatIP instead of torch")
    parser.add_argument("--index", type=Path, default=None, help="index file (default runs/bench/query_latency-<n>.idx)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the index even if one matches")
    parser.add_argument("--out", type=Path, default=RESULTS / "query_latency.json")
    args = parser.parse_args()
    model = args.model or str(EXPORT if (EXPORT / "manifest.json").is_file() else CHECKPOINT)
    path = args.index or ROOT / "runs" / "bench" / f"query_latency-{args.n}.idx"
    torch.set_num_threads(args.threads)
    index = get_index(path, model, args.n, args.rebuild, args.threads)
    if args.faiss:
        index = SearchIndex(index.data, backend="faiss")
    embedder = load_embedder(model, threads=args.threads)
    texts = queries(args.queries)
    for text in texts[:20]:  # warm-up
        index.search(embedder.encode_texts([text])[0], args.k)
    encode, search, total = [], [], []
    for _ in range(args.repeats):
        for text in texts:
            t0 = time.perf_counter()
            vector = embedder.encode_texts([text])[0]
            t1 = time.perf_counter()
            index.search(vector, args.k)
            t2 = time.perf_counter()
            encode.append((t1 - t0) * 1e3)
            search.append((t2 - t1) * 1e3)
            total.append((t2 - t0) * 1e3)

    growth = {}
    vectors = embedder.encode_texts(texts[:50])
    for size in sorted({s for s in (1_000, 10_000, len(index)) if s <= len(index)}):
        part = SearchIndex({**index.data, "embeddings": index.matrix[:size], "ids": index.ids[:size]}, backend=index.backend)
        times = []
        for _ in range(max(1, 600 // len(vectors))):
            for v in vectors:
                t = time.perf_counter()
                part.search(v, args.k)
                times.append((time.perf_counter() - t) * 1e3)
        growth[size] = stats(times)

    result = {
        "n": len(index), "k": args.k, "model": resolve_spec(model), "embedder": embedder.describe(),
        "backend": index.backend, "threads": args.threads, "queries": len(texts), "repeats": args.repeats,
        "encode_ms": stats(encode), "search_ms": stats(search), "total_ms": stats(total),
        "search_ms_by_size": {str(k): v for k, v in growth.items()},
    }  # fmt: skip
    print(f"\n{len(index)} images, {embedder.describe()}, {index.backend} search, {args.threads} thread(s), "
          f"{len(total)} queries")  # fmt: skip
    print("| stage | median ms | p90 ms | mean ms |\n|---|---:|---:|---:|")
    for name, key in (("tokenize + encode", "encode_ms"), (f"top-{args.k} search", "search_ms"), ("**total**", "total_ms")):
        s = result[key]
        print(f"| {name} | {s['median']:.2f} | {s['p90']:.2f} | {s['mean']:.2f} |")
    print("\n| index size | search median ms |\n|---:|---:|")
    for size, s in growth.items():
        print(f"| {size:,} | {s['median']:.3f} |")
    write(result, args.out)


if __name__ == "__main__":
    main()
