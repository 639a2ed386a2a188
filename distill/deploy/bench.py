"""`distill bench`: the efficiency table of deployed models, teachers and students side by side.

A target is a `distill fit` checkpoint with an optional `:model` suffix (default
`eval.model`), run in PyTorch, or an export folder (`distill export`), run by its runtime.
Per target: parameters, file size, per-item image and text encode latency at batch 1 and
at a chosen batch (medians, `distill.eval.efficiency`), peak memory of encoding one batch,
and exact top-10 search latency over indexes of growing size at the target's width.
Writes `bench.json`, `bench.md` and `bench_search.png`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import Tensor

from distill.deploy.embedders import split_spec
from distill.deploy.export import pick_encoder
from distill.deploy.runtime import MANIFEST, ExportedModel, default_threads
from distill.deploy.search import torch_threads
from distill.errors import ConfigError
from distill.eval.efficiency import (
    count_parameters,
    encode_latency_ms,
    file_size_mb,
    median_ms,
    peak_memory_mb,
)
from distill.io import atomic_path, write_json, write_text
from distill.models.base import Encoder
from distill.training.checkpoint import load_checkpoint

SEARCH_SIZES = (1_000, 10_000, 100_000)
TOP_K = 10
CAPTIONS = (
    "a small red circle",
    "a large blue square to the left of a green triangle",
    "two yellow stars above a purple circle on a grey background",
    "an orange triangle below a small white square",
    "three shapes: a red star, a blue circle and a green square, side by side",
)
"""Benchmark captions in the embedded benchmark's style, of varied lengths."""


class ExportedEncoder(Encoder):
    """An export folder behind the `Encoder` calls, so one latency helper times every target."""

    def __init__(self, model: ExportedModel) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return torch.from_numpy(self.model.encode_pixels(pixel_values.numpy()))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return torch.from_numpy(self.model.encode_tokens(input_ids.numpy(), attention_mask.numpy()))


@dataclass
class Target:
    """A model to measure: its encoder, how to tokenize for it, and its static figures."""

    name: str
    kind: str
    encoder: Encoder
    image_size: int
    embed_dim: int
    params: int
    size_mb: float
    tokenize: Any


def _checkpoint_target(path: Path, model: str | None, modules: dict[Path, Any]) -> Target:
    if path not in modules:
        modules[path] = load_checkpoint(path)
    name, encoder = pick_encoder(modules[path], model, path)
    image_pre, text_pre = encoder.image_preprocess(), encoder.text_preprocess()
    with torch.inference_mode():
        dim = int(encoder.encode_image(torch.zeros(1, 3, *image_pre.out_size)).shape[-1])
    with tempfile.TemporaryDirectory() as tmp:  # the size of this model's weights alone, as a file
        save_model(encoder, f"{tmp}/weights.safetensors")
        size = file_size_mb(f"{tmp}/weights.safetensors")
    return Target(
        name=f"{path.parent.name}:{name}", kind="checkpoint", encoder=encoder, image_size=image_pre.out_size[0],
        embed_dim=dim, params=count_parameters(encoder), size_mb=size, tokenize=text_pre,
    )


def _stored_params(model: ExportedModel) -> int:
    """Elements of the weight tensors stored in an export's two files."""
    files = [model.folder / model.manifest[m]["file"] for m in ("image", "text")]
    if model.manifest["format"] == "onnx":
        import onnx  # onnx: heavy, only for exported targets

        return sum(
            int(np.prod(t.dims)) for f in files for t in onnx.load(str(f), load_external_data=False).graph.initializer
        )
    total = 0
    for f in files:  # frozen TorchScript keeps its weights as graph constants, not in its state_dict
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14
            module = torch.jit.load(str(f), map_location="cpu")
        total += sum(v.numel() for v in module.state_dict().values())
        for node in module.graph.findAllNodes("prim::Constant"):
            value = node.output().toIValue() if node.output().type().kind() == "TensorType" else None
            total += value.numel() if isinstance(value, Tensor) else 0
    return total


def _export_target(folder: Path, threads: int) -> Target:
    model = ExportedModel(folder, threads=threads)
    m = model.manifest
    size = sum(file_size_mb(folder / m[k]["file"]) for k in ("image", "text"))
    quant = f", text {m['text']['quantized']}" if m["text"].get("quantized") else ""

    def tokenize(texts: Sequence[str]) -> dict[str, Tensor]:
        return {k: torch.from_numpy(v) for k, v in model.tokenize(texts).items()}

    return Target(
        name=folder.name, kind=f"{m['format']}{quant}", encoder=ExportedEncoder(model), image_size=model.size,
        embed_dim=model.embed_dim, params=_stored_params(model), size_mb=size, tokenize=tokenize,
    )


def load_target(spec: str, *, threads: int, modules: dict[Path, Any] | None = None) -> Target:
    """A target from `path.ckpt`, `path.ckpt:model` or an export folder; `ConfigError` otherwise."""
    path, model = split_spec(spec)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"bench target {spec!r}: folder has no {MANIFEST} (not a `distill export` folder)")
        return _export_target(path, threads)
    if path.suffix != ".ckpt" or not path.is_file():
        raise ConfigError(f"bench target {spec!r}: no such checkpoint (.ckpt[:model]) or export folder")
    return _checkpoint_target(path, model, {} if modules is None else modules)


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`), so RSS growth shows new peaks."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak is then a lower bound
        pass


def measure(target: Target, *, batch_size: int, repeats: int, warmup: int) -> dict[str, float]:
    """Encode latency (ms per item) at batch 1 and `batch_size`, and peak memory of one batch."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, target.image_size, target.image_size, generator=gen)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    tokens = target.tokenize(captions)

    def encode_batch() -> None:
        with torch.inference_mode():
            target.encoder.encode_image(images)
            target.encoder.encode_text(tokens["input_ids"], tokens["attention_mask"])

    _release_free_memory()  # so that reused, already resident memory does not hide the peak
    peak = peak_memory_mb(encode_batch)
    one = encode_latency_ms(target.encoder, images[:1], target.tokenize(captions[:1]), repeats, warmup)
    many = encode_latency_ms(target.encoder, images, tokens, repeats, warmup)
    return {
        "image_ms_b1": one["image_ms"], "text_ms_b1": one["text_ms"],
        "image_ms": many["image_ms"], "text_ms": many["text_ms"], "peak_mb": peak,
    }


def search_latency_ms(dim: int, sizes: Sequence[int], *, repeats: int, warmup: int, k: int = TOP_K) -> dict[int, float]:
    """Median ms of one exact top-k query over `n` random unit vectors of width `dim`, per size.

    Scores are one float32 matrix-vector product in torch (so torch's thread setting
    applies); the top k are sorted. Random vectors are enough: the cost does not depend on
    the values.
    """
    gen = torch.Generator().manual_seed(0)
    out: dict[int, float] = {}
    for n in sizes:
        index = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
        query = index[n // 2].clone()
        with torch.inference_mode():
            out[n] = median_ms(lambda i=index, q=query: top_k(i, q, k), repeats, warmup, sync=False)
    return out


def top_k(index: Tensor, query: Tensor, k: int = TOP_K) -> Tensor:
    """Rows of the k best scores `index @ query`, best first (exact)."""
    scores = index @ query
    return torch.topk(scores, min(k, len(scores))).indices


def run_bench(
    targets: Sequence[str],
    output: str | Path,
    *,
    batch_size: int = 32,
    repeats: int = 20,
    warmup: int = 3,
    sizes: Sequence[int] = SEARCH_SIZES,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure every target, write `bench.json`, `bench.md` and `bench_search.png` into `output`.

    Args:
        targets: Checkpoints (`run/final.ckpt`, `run/final.ckpt:teacher`) or export folders.
        output: Folder for the report.
        batch_size: The batched latency's batch size.
        repeats: Timed calls per median.
        warmup: Untimed calls first.
        sizes: Index sizes of the search curve.
        threads: CPU threads for PyTorch and onnxruntime alike (default `default_threads()`).

    Returns:
        The report (what `bench.json` holds).
    """
    if not targets:
        raise ConfigError("bench: give at least one checkpoint or export folder")
    for name, value, low in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--sizes: index sizes must be positive, got {list(sizes)}")
    threads = threads or default_threads()
    modules: dict[Path, Any] = {}
    loaded = [load_target(spec, threads=threads, modules=modules) for spec in targets]  # all errors before timing
    rows, curves = [], {}
    with torch_threads(threads):
        for target in loaded:
            if target.embed_dim not in curves:
                curves[target.embed_dim] = search_latency_ms(target.embed_dim, sizes, repeats=repeats, warmup=warmup)
            rows.append({
                "name": target.name, "kind": target.kind, "embed_dim": target.embed_dim,
                "params": target.params, "size_mb": target.size_mb,
                **measure(target, batch_size=batch_size, repeats=repeats, warmup=warmup),
                "search_ms": {str(n): ms for n, ms in curves[target.embed_dim].items()},
            })
    report = {
        "settings": {
            "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "threads": threads, "top_k": TOP_K,
            "sizes": list(sizes), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
        },
        "targets": rows,
    }
    write_report(report, Path(output))
    return report


def _version(package: str) -> str | None:

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_table(report: dict[str, Any]) -> str:
    """The Markdown table of `bench.md`; speed-up is against the first row (image + text, batch 1)."""
    s, rows = report["settings"], report["targets"]
    b = s["batch_size"]
    sizes = [str(n) for n in s["sizes"]]
    head = ["Target", "Kind", "Dim", "Params (M)", "Size (MB)", "Image ms b1", "Text ms b1",
            f"Image ms/item b{b}", f"Text ms/item b{b}", "Peak MB", *(f"Search ms {_short(n)}" for n in sizes), "Speed-up b1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = rows[0]["image_ms_b1"] + rows[0]["text_ms_b1"]
    for r in rows:
        cells = [
            r["name"], r["kind"], str(r["embed_dim"]), f"{r['params'] / 1e6:.2f}", f"{r['size_mb']:.1f}",
            f"{r['image_ms_b1']:.2f}", f"{r['text_ms_b1']:.2f}", f"{r['image_ms']:.3f}", f"{r['text_ms']:.3f}",
            f"{r['peak_mb']:.0f}", *(f"{r['search_ms'][n]:.3f}" for n in sizes),
            f"{ref / (r['image_ms_b1'] + r['text_ms_b1']):.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(n: str) -> str:
    value = int(n)
    return f"{value // 1000}K" if value >= 1000 and value % 1000 == 0 else n


def write_report(report: dict[str, Any], output: Path) -> None:
    """`bench.json`, `bench.md` (settings + table) and `bench_search.png` in `output`."""
    import matplotlib  # matplotlib: heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: heavy, only for plots

    write_json(output / "bench.json", report)
    s = report["settings"]
    notes = (
        f"{s['threads']} thread(s), {s['cores']} cores, torch {s['torch']}, onnxruntime {s['onnxruntime']}; "
        f"medians of {s['repeats']} timed calls after {s['warmup']} warm-up calls. Encode latency is per item "
        "and excludes preprocessing and tokenisation. Peak MB: resident memory added while encoding one "
        f"batch of {s['batch_size']} images and captions, the model already loaded. Search: exact top-{s['top_k']} "
        "of one query over random unit vectors of the target's width (float32 matrix product)."
    )
    write_text(output / "bench.md", f"# Efficiency report\n\n{notes}\n\n{format_table(report)}\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for dim in sorted({r["embed_dim"] for r in report["targets"]}):
        names = ", ".join(r["name"] for r in report["targets"] if r["embed_dim"] == dim)
        curve = next(r["search_ms"] for r in report["targets"] if r["embed_dim"] == dim)
        ax.plot([int(n) for n in curve], list(curve.values()), marker="o", label=f"{dim}-d ({names})")
    ax.set(xscale="log", yscale="log", xlabel="index size (items)", ylabel=f"top-{s['top_k']} query latency (ms)",
           title="Exact search latency vs index size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(output / "bench_search.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
