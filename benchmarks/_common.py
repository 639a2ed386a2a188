"""What the benchmark scripts share: experiment configs with swapped models, interleaved timing."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill.config.load import apply_overrides, config_from_raw, load_raw
from distill.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def bert(hidden: int, layers: int) -> dict[str, Any]:
    """A randomly initialised BERT text tower config of the given width and depth."""
    return {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(2, hidden // 64), "intermediate_size": 4 * hidden,
            "max_position_embeddings": 64}  # fmt: skip


def experiment(name: str, models: dict[str, dict[str, Any]], overrides: list[str]) -> Config:
    """`experiments/<name>.yaml` with some models replaced wholesale, then overrides."""
    raw = load_raw(ROOT / "experiments" / f"{name}.yaml")
    for model, spec in models.items():
        raw.models[model] = spec
    return config_from_raw(apply_overrides(raw, overrides))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds of each fn, `repeats` times, round-robin with a rotating start so that
    drift in machine load hits every variant alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    """The median of a list of numbers."""
    return statistics.median(xs)


def write(result: dict[str, Any], path: Path) -> None:
    """Add the machine description and write `result` as JSON."""
    result["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cpu": platform.processor() or platform.machine()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def status_kib(key: str) -> int:
    """A `/proc/self/status` figure in KiB (`VmRSS`, `VmHWM`; Linux). Write "5" to
    /proc/self/clear_refs to reset `VmHWM` to the current resident size before a step."""
    found = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")
    return int(found.group(1))
