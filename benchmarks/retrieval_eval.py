"""Benchmark `retrieval_metrics` (5K images x 25K captions) against torchmetrics.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/retrieval_eval.py [--images 5000] [--small-images 1000]

Embeddings are random unit vectors in D=256; each image has 5 captions = its embedding
plus noise (so recall is neither 0 nor 100, as on COCO). Ours is timed at full size (median of
`--repeats`); torchmetrics builds one (query, candidate) pair per matrix entry, so at full
size it needs 125M pairs per direction (several GB, a Python loop over 30K queries): it is
timed once at `--small-images` (same 5 captions per image) next to ours at that size, the
results are checked to agree, and its full-size time is extrapolated from a power law
fitted through `--small-images` / 2 and `--small-images` (and, more simply, in
proportion to the number of pairs). torchmetrics' RetrievalRecall is the fraction of a query's
positives in the top K, which for image->text (5 positives) is not "any caption in the
top K"; that is RetrievalHitRate, used for image->text (same base class, same cost).
Writes benchmarks/results/retrieval_eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall

from distill.eval.efficiency import peak_memory_mb
from distill.eval.retrieval import retrieval_metrics

KS = (1, 5, 10)
NOISE = 5.0  # caption noise norm vs unit image: R@1 about 63 (i2t) and 31 (t2i) at 5K
RESULTS = Path(__file__).parent / "results" / "retrieval_eval.json"


def make_set(n: int, caps: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unit image embeddings, ids 0..n-1, and `caps` noisy captions per image."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    ids = torch.arange(n)
    owner = ids.repeat_interleave(caps)
    noise = NOISE * torch.randn(n * caps, dim, generator=g) / dim**0.5
    txt = F.normalize(img[owner] + noise, dim=1)
    return img, ids, txt, owner


def torchmetrics_recall(
    img: Tensor, ids: Tensor, txt: Tensor, text_ids: Tensor
) -> dict[str, float]:
    """The same six numbers with torchmetrics' indexed retrieval metrics."""
    sim = img @ txt.T  # (N, T)
    out: dict[str, float] = {}
    for name, preds, target, cls in (
        ("i2t", sim, ids[:, None] == text_ids[None, :], RetrievalHitRate),
        ("t2i", sim.T, text_ids[:, None] == ids[None, :], RetrievalRecall),
    ):
        indexes = torch.arange(preds.shape[0])[:, None].expand_as(preds).reshape(-1)
        for k in KS:
            metric = cls(top_k=k)
            metric.update(preds.reshape(-1), target.reshape(-1), indexes=indexes)
            out[f"{name}_r{k}"] = 100.0 * metric.compute().item()
    out["rsum"] = sum(out.values())
    return out


def timed(fn: Callable[[], dict[str, float]], repeats: int) -> dict[str, Any]:
    """Median and all wall times of `fn()` in seconds, and the last result as `metrics`."""
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "times_s": [round(t, 4) for t in times],
        "metrics": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    caps = args.captions_per_image

    full = make_set(args.images, caps, args.dim)
    peak = peak_memory_mb(lambda: retrieval_metrics(*full))  # first, before caches grow
    ours_full = timed(lambda: retrieval_metrics(*full), args.repeats)
    ours_full["peak_mib"] = peak
    chunks = {c: timed(lambda c=c: retrieval_metrics(*full, chunk_size=c), 1)["median_s"]
              for c in (256, 512, 2048)}  # fmt: skip

    small = make_set(args.small_images, caps, args.dim)
    ours_small = timed(lambda: retrieval_metrics(*small), args.repeats)
    tm_peak = peak_memory_mb(lambda: torchmetrics_recall(*small))
    tm_small = timed(lambda: torchmetrics_recall(*small), 1)
    tm_small["peak_mib"] = tm_peak
    agree = all(abs(ours_small["metrics"][k] - v) < 1e-3 for k, v in tm_small["metrics"].items())
    speedup = tm_small["median_s"] / ours_small["median_s"]
    # Full-size torchmetrics estimates: proportional to the number of pairs (n^2), and a
    # power law t ~ n^alpha fitted through n/2 and n images.
    half = make_set(args.small_images // 2, caps, args.dim)
    tm_half_s = timed(lambda: torchmetrics_recall(*half), 1)["median_s"]
    alpha = math.log(tm_small["median_s"] / tm_half_s, args.small_images / (args.small_images // 2))
    scale = args.images / args.small_images
    tm_full_estimate = tm_small["median_s"] * scale**2
    tm_full_fitted = tm_small["median_s"] * scale**alpha

    n_txt, n_small_txt = args.images * caps, args.small_images * caps
    rows = [
        (f"ours {args.images}x{n_txt}", ours_full["median_s"], ours_full["peak_mib"]),
        (f"ours {args.small_images}x{n_small_txt}", ours_small["median_s"], None),
        (
            f"torchmetrics {args.small_images}x{n_small_txt}",
            tm_small["median_s"],
            tm_small["peak_mib"],
        ),
        (f"torchmetrics {args.images}x{n_txt} (est. ~pairs)", tm_full_estimate, None),
        (f"torchmetrics {args.images}x{n_txt} (est. ~n^{alpha:.2f})", tm_full_fitted, None),
    ]
    print(f"{'run':<42}{'seconds':>10}{'peak MiB':>10}")
    for name, seconds, mib in rows:
        print(f"{name:<42}{seconds:>10.3f}{'' if mib is None else f'{mib:.0f}':>10}")
    print(
        f"chunk_size sweep at full size (s): {chunks} (default 1024: {ours_full['median_s']:.3f})"
    )
    print(f"speed-up vs torchmetrics at {args.small_images} images: {speedup:.0f}x "
          f"(estimated at full size: {tm_full_estimate / ours_full['median_s']:.0f}x); "
          f"same numbers: {agree}")  # fmt: skip
    targets = {
        "ours_full_le_2s": ours_full["median_s"] <= 2.0,
        "speedup_ge_10x": speedup >= 10.0,
        "peak_le_1GiB": ours_full["peak_mib"] <= 1024.0,
    }
    print(f"targets: {targets}")
    result = {
        "config": {**vars(args), "out": str(args.out), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
        "ours_full": ours_full,
        "ours_chunk_sweep_s": chunks,
        "ours_small": ours_small,
        "torchmetrics_small": tm_small,
        "torchmetrics_half_small_s": tm_half_s,
        "torchmetrics_scaling_exponent": alpha,
        "torchmetrics_full_estimate_pairs_s": tm_full_estimate,
        "torchmetrics_full_estimate_fitted_s": tm_full_fitted,
        "speedup_small": speedup,
        "metrics_agree_small": agree,
        "targets": targets,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
