"""The teacher cache laid out with the data shards (`cache.layout: shards`).

For sharded data (webdataset), each data shard gets its own cache files, found by the
shard's name, so no process ever holds a global key table and building needs no merge:

    <entry>/meta.json                                   written last, by rank 0
    <entry>/shards/<shard stem>-<url hash>/<output>.npy       (n, V x D) float16
                                          <output>.keys.npy  (n,) sorted keys of this shard
                                          done.json          shapes, sizes, sha256: written last

Building (`build_shards`): rank r of W takes shards r, r + W, r + 2W, ... (across nodes
too: N nodes x G GPUs are W = N G ranks), loader workers split a rank's shards again; a
shard whose `done.json` exists is skipped, so a build killed half-way resumes shard by
shard. The shard's rows are written to temporary files and renamed (`distill.io`), then its
`done.json`: a shard is complete or absent. Build time is (shards / W) x (time per shard),
with no serial step but rank 0's `meta.json` (one small read per shard).

Reading (`ShardCachedNode`): a batch row's key is a `SampleKey` that knows its shard; the
node opens that shard's arrays memory-mapped on first use (keeping the most recent
`OPEN_SHARDS` open) and finds the row by binary search in the shard's own keys. Memory per
rank is the open shards' key tables (a 10K-sample shard: about 0.2 MB), not the dataset's.

A DataCompDR-style dataset (teacher embeddings of V augmented views stored with the samples)
maps onto this layout: its per-shard embeddings are that shard's `image.npy` (one row of V x
D per image) and `text.npy`, its sample keys the tar members' keys, its V our
`data.augment.views`. Its stored view parameters would take the place of
`distill.augment.draw_view`'s, which recomputes them from (`data.augment.seed`, key, view
index, image size); reading stored parameters is not built (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.batch import Batch
from distill.data.base import CaptionDataset
from distill.data.loading import Collator
from distill.errors import ConfigError
from distill.io import atomic_path, write_json
from distill.models.base import Encoder
from distill.training.cache.arrays import (
    REBUILD,
    array_files,
    array_record,
    file_sha256,
    find_keys,
    finite_rows,
    select_views,
)
from distill.training.cache.encode import encode_rows, encoder_inputs
from distill.training.progress import CountProgress

OPEN_SHARDS = 64
"""Shards whose key tables a `ShardCachedNode` keeps open at once."""
DONE = "done.json"


def shard_dir(url: str) -> str:
    """The folder name of a shard's cache files: its file stem and a hash of its full URL
    (two `000.tar` in different folders do not collide)."""
    stem = Path(url.rstrip("/").rsplit("/", 1)[-1]).name.split(".")[0] or "shard"
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"


def shard_done(folder: Path, url: str) -> dict[str, Any] | None:
    """The `done.json` of a shard's cache (None while it is not complete)."""
    try:
        return json.loads((folder / "shards" / shard_dir(url) / DONE).read_text())
    except (OSError, ValueError):
        return None


class ShardStream(IterableDataset):
    """(shard URL, chunk inputs or None at the shard's end) over this rank's unfinished shards,
    each loader worker a disjoint share of them."""

    def __init__(self, dataset: CaptionDataset, urls: list[str], collator: Collator, batch_size: int) -> None:
        self.dataset, self.urls, self.collator, self.batch_size = dataset, urls, collator, batch_size

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        info = get_worker_info()
        for url in self.urls[info.id :: info.num_workers] if info else self.urls:
            for chunk in encoder_inputs(self.dataset.shard_images(url, Counter()), self.collator, self.batch_size):
                yield url, chunk
            yield url, None


def build_shards(
    dataset: CaptionDataset, model: Encoder, outputs: list[str], folder: Path, collator: Collator, *,
    rank: int, world: int, batch_size: int, num_workers: int, name: str, force: bool = False,
) -> list[str]:
    """Encode every unfinished shard of this rank's share into `folder/shards/` (see the module
    docstring); returns the shards this rank built."""
    urls = dataset.shards("train") or []
    mine = [u for u in urls[rank::world] if force or shard_done(folder, u) is None]
    if not mine:
        return []
    loader = DataLoader(ShardStream(dataset, mine, collator, batch_size), batch_size=None,
                        num_workers=min(num_workers, len(mine)))
    pending: dict[str, dict[str, tuple[list[str], list[np.ndarray]]]] = {}
    shown = CountProgress(f"cache: models.{name} shards of rank {rank}", len(mine), "shard")
    with torch.no_grad():
        for url, chunk in loader:
            held = pending.setdefault(url, {o: ([], []) for o in outputs})
            if chunk is None:
                write_shard(folder / "shards" / shard_dir(url), url, pending.pop(url))
                shown.update()
                continue
            image_keys, images, sample_keys, texts = chunk
            for output in outputs:
                keys = image_keys if output == "image" else sample_keys
                held[output][0].extend(keys)
                held[output][1].append(encode_rows(model, output, images if output == "image" else texts, keys, name))
    shown.close()
    return mine


def write_shard(where: Path, url: str, held: dict[str, tuple[list[str], list[np.ndarray]]]) -> None:
    """One shard's sorted arrays, then its `done.json` (sizes, sha256): complete or absent."""
    where.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for output, (keys, parts) in held.items():
        rows = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float16)
        order = np.argsort(np.array([k.encode() for k in keys]), kind="stable")
        rows_name, keys_name = array_files(output)
        with atomic_path(where / rows_name) as tmp:
            np.save(tmp, rows[order])
        with atomic_path(where / keys_name) as tmp:
            np.save(tmp, np.array([keys[i].encode() for i in order], dtype="S") if keys else np.array([], dtype="S1"))
        shapes[output] = {"rows": len(keys), "width": int(rows.shape[1]) if rows.ndim == 2 else 0}
    write_json(where / DONE, {"url": url, "outputs": shapes, "arrays": array_record(where, list(held))})


class ShardCachedNode:
    """Reads one cached node's rows from the per-shard layout, by each row's shard and key.

    Args:
        folder: The cache entry.
        output: `image` (rows keyed by image key) or `text` (by sample key).
        node: The graph node it serves, for error messages.
        views: V when the entry holds V augmented views per image.
    """

    def __init__(self, folder: str | Path, output: str, node: str, views: int | None = None) -> None:
        self.folder, self.output, self.node, self.views = Path(folder), output, node, views
        self._open: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # pickle the paths, not the mapped arrays
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard(self, url: str) -> tuple[np.ndarray, np.ndarray]:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        where = self.folder / "shards" / shard_dir(url)
        rows_name, keys_name = array_files(self.output)
        try:
            keys, rows = np.load(where / keys_name, mmap_mode="r"), np.load(where / rows_name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: the cache of shard {url} cannot be read for {self.node} ({e}); "
                              f"{REBUILD}") from None
        if rows.ndim != 2 or rows.shape[0] != keys.shape[0]:
            raise ConfigError(f"{where / rows_name}: holds {rows.shape} rows for {keys.shape} keys; {REBUILD}")
        self._open[url] = (keys, rows)
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return keys, rows

    def __call__(self, batch: Batch) -> Tensor:
        """(len(batch), D) float32 rows of the batch's samples (at their views).

        Raises:
            ConfigError: If a key does not know its shard (data that is not sharded), is not
                in its shard's cache, or a row read is not finite.
        """
        keys = batch.keys
        wanted = [k.rsplit("/", 1)[0] for k in keys] if self.output == "image" else list(keys)
        out: np.ndarray | None = None
        by_shard: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            shard = getattr(k, "shard", None)
            if shard is None:
                raise ConfigError(f"cache.layout: the entry {self.folder} is laid out by shard, but sample {str(k)!r} "
                                  "does not know its shard (only webdataset data does); use cache.layout=global")
            by_shard.setdefault(shard, []).append(i)
        for shard, rows_of in by_shard.items():
            stored, rows = self._shard(shard)
            idx, found = find_keys(stored, [wanted[i] for i in rows_of])
            if not found.all():
                missing = wanted[rows_of[int(np.flatnonzero(~found)[0])]]
                raise ConfigError(f"{self.folder}: key {missing!r} of {self.node} is not in the cache of shard "
                                  f"{shard}: the shard changed without changing its size or mtime; {REBUILD}")
            part = np.asarray(rows[idx], dtype=np.float32)
            if out is None:
                out = np.empty((len(keys), part.shape[1]), dtype=np.float32)
            out[rows_of] = part
        assert out is not None
        rows_t = finite_rows(out, wanted, self.folder / "shards", self.node)
        return select_views(rows_t, self.views, batch, self.folder, self.node)


def shard_problems(folder: Path, meta: dict[str, Any], outputs: list[str], *, hashes: bool = False) -> list[str]:
    """Problems of a per-shard entry, one line each naming the file: a shard without `done.json`
    or without an output, a file whose size differs from its `done.json` record (one stat per
    file), and with `hashes` (`distill cache --verify`) a sha256 that differs."""
    problems = []
    for url in meta.get("shards", []):
        where = folder / "shards" / shard_dir(url)
        record = shard_done(folder, url)
        if record is None:
            problems.append(f"{where / DONE}: missing (shard {url} not built)")
            continue
        for output in outputs:
            if output not in record.get("outputs", {}):
                problems.append(f"{where}: holds no {output} rows")
                continue
            for name in array_files(output):
                path, want = where / name, record.get("arrays", {}).get(name, {})
                size = path.stat().st_size if path.is_file() else None
                if size is None:
                    problems.append(f"{path}: missing")
                elif size != want.get("bytes"):
                    problems.append(f"{path}: {size} bytes where done.json says {want.get('bytes')}")
                elif hashes and file_sha256(path) != want.get("sha256"):
                    problems.append(f"{path}: damaged: its sha256 differs from the one in done.json")
    return problems
