"""Size, latency and memory of a model, measured on the CPU for the comparison report.

Sizes are binary: 1 MB here is 1 MiB = 2**20 bytes.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.models.base import Encoder

_MIB = 2**20


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once).

    Args:
        module: The model.
        trainable_only: Count only parameters with `requires_grad`.

    Returns:
        The parameter count, e.g. 16 for `nn.Linear(3, 4)`.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def file_size_mb(path: str | os.PathLike[str]) -> float:
    """Size of a file (e.g. a checkpoint) in MiB."""
    return Path(path).stat().st_size / _MIB


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, sync: bool) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` unmeasured calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def encode_latency_ms(
    encoder: Encoder,
    image_input: Tensor,
    text_inputs: dict[str, Tensor],
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Per-item encoding latency for images and captions (median of `repeats` timed calls).

    The batch size is that of the inputs: pass one image and one caption for batch-1
    latency, or a batch for throughput-style latency per item. Runs under
    `torch.inference_mode` in eval mode (restored afterwards) on the inputs' device, with
    the process's current `torch.get_num_threads()`.

    Args:
        encoder: The model.
        image_input: (B, 3, H, W) pixel values.
        text_inputs: {"input_ids", "attention_mask"}, each (B', L).
        repeats: Timed calls per modality.
        warmup: Untimed calls first (allocator and kernel warm-up).

    Returns:
        `image_ms` and `text_ms` (ms per item), `image_batch_ms` and `text_batch_ms` (ms per
        call), `image_batch_size` and `text_batch_size`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ids, mask = text_inputs["input_ids"], text_inputs["attention_mask"]
    sync = image_input.is_cuda
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            image_ms = median_ms(lambda: encoder.encode_image(image_input), repeats, warmup, sync)
            text_ms = median_ms(lambda: encoder.encode_text(ids, mask), repeats, warmup, sync)
    finally:
        encoder.train(was_training)
    n_img, n_txt = image_input.shape[0], ids.shape[0]
    return {
        "image_ms": image_ms / n_img,
        "text_ms": text_ms / n_txt,
        "image_batch_ms": image_ms,
        "text_batch_ms": text_ms,
        "image_batch_size": float(n_img),
        "text_batch_size": float(n_txt),
    }


def _read_status_kib(field: str) -> int | None:
    """A `VmHWM`/`VmRSS`-style field of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory that `fn()` adds on top of the process's current RSS, in MiB.

    Resident set size sees every allocation (torch's CPU allocator included, unlike
    `tracemalloc`). On Linux the kernel's peak counter is reset first
    (`/proc/self/clear_refs`), so the result is the true peak of `fn` minus the RSS before
    it. Elsewhere it falls back to the growth of `ru_maxrss`, which is only a lower bound:
    0 when `fn` stays below an earlier peak of the process (measure in a fresh process).
    Other threads' allocations during `fn` are included. GPU memory is not.

    Args:
        fn: The work to measure; its result is discarded.

    Returns:
        The peak increase in MiB (>= 0).
    """
    if _reset_peak_rss() and (before_kib := _read_status_kib("VmRSS")) is not None:
        fn()
        peak_kib = _read_status_kib("VmHWM") or before_kib
        return max(peak_kib - before_kib, 0) / 1024
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(after - before, 0) * unit / _MIB
