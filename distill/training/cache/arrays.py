"""The files and rows of a cache entry, shared by both layouts (`store`: one key table per
output; `shards`: one per data shard): file names, `.npy` headers, checksums, and the checks
and view selection of rows read."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.batch import Batch
from distill.errors import ConfigError

REBUILD = "rebuild it with `distill cache CONFIG --force`"

def array_files(output: str) -> tuple[str, str]:
    """The files of one cached output: its rows and its sorted keys."""
    return f"{output}.npy", f"{output}.keys.npy"

def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, the file size they imply) from a `.npy` header, reading only the header.

    Raises:
        ValueError: If the file does not start with a `.npy` header of version 1 or 2.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return tuple(shape), dtype, f.tell() + int(np.prod(shape)) * dtype.itemsize

def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes (read in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def array_record(folder: str | Path, outputs: list[str]) -> dict[str, dict[str, Any]]:
    """Array file -> {"bytes", "sha256"} for the `arrays` field of `meta.json`."""
    folder = Path(folder)
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for output in outputs
        for name in array_files(output)
    }

def finite_rows(out: np.ndarray, wanted: list[str], path: Path, node: str) -> Tensor:
    """`out` as a tensor after checking that every row read is finite (B x D values: ~35 us
    for 256 x 256); the cache never stores a non-finite value, so one is damage.

    Raises:
        ConfigError: Naming the file (`path`), how many rows and the first key.
    """
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        first = wanted[int(np.flatnonzero(bad)[0])]
        raise ConfigError(
            f"{path}: {int(bad.sum())} of {len(wanted)} rows read for {node} are not finite (e.g. {first!r}): the "
            f"file is damaged; check it with `distill cache CONFIG --verify` and {REBUILD}"
        )
    return torch.from_numpy(out)

def select_views(rows: Tensor, views: int | None, batch: Batch | list[str], folder: Path, node: str) -> Tensor:
    """Each row's stored view (`Batch.views`) out of its V x D values; `rows` when there are no views.

    Raises:
        ConfigError: If the entry holds views but the batch shows unaugmented images.
    """
    if views is None:
        return rows
    if isinstance(batch, list) or batch.views is None:
        raise ConfigError(f"{folder}: holds {views} augmented views per image for {node}, but the batch shows "
                          "unaugmented images; set data.augment.enabled=true or use another cache")
    v = batch.views.cpu() % views
    return rows.view(len(rows), views, -1)[torch.arange(len(rows)), v]


def find_keys(stored: np.ndarray, wanted: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row index, found) of each wanted key in the sorted fixed-width key table `stored`.

    A key longer than the table's width cannot be in it and is not searched: comparing it
    would make numpy widen (copy) the whole memory-mapped table first."""
    query = np.array([k.encode() for k in wanted])
    if not len(stored):
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    fits = np.array([len(k) <= stored.dtype.itemsize for k in query], dtype=bool)
    query = query.astype(stored.dtype)  # the keys that do not fit are truncated, then refused below
    idx = np.searchsorted(stored, query).clip(0, len(stored) - 1)
    return idx, fits & (stored[idx] == query)
