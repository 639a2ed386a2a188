"""What every registered dataset provides, and the helpers the readers share.

A dataset class (registered in `DATASETS`) is cheap to construct; it touches files only in
`check`, `prepare` and when iterated. Iteration is always for one `Part` of the data (one
DDP rank and one loader worker), so that parts are disjoint and together cover everything.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from distill.config.signature import check_kwargs
from distill.errors import ConfigError
from distill.registry import DATASETS

T = TypeVar("T")

Sample = tuple[str, int, Image.Image, str]
"""A training pair: (`<image key>/<caption index>`, image id, RGB image, caption)."""
EvalImage = tuple[int, Image.Image, list[str]]
"""An evaluation image: (image id, RGB image, all its captions)."""

TRAIN_MODES = ("all", "random")


class SampleKey(str):
    """A sample key that knows the data shard it was read from (`shard`: the shard's URL).

    Sharded readers (webdataset) yield their keys as `SampleKey`s, and the captions' sample
    keys inherit the shard, so a batch row can be looked up in a per-shard teacher cache
    (`distill.training.cache.shards`) without a global key table. It compares, hashes and
    prints as the plain key, and survives pickling between loader workers."""

    shard: str

    def __new__(cls, key: str, shard: str) -> SampleKey:
        out = super().__new__(cls, key)
        out.shard = shard
        return out

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return SampleKey, (str(self), self.shard)


def with_shard(key: str, source: str) -> str:
    """`key` as a `SampleKey` of the shard of `source` when `source` knows one, else `key`."""
    return SampleKey(key, source.shard) if isinstance(source, SampleKey) else key


@dataclass(frozen=True)
class Part:
    """One consumer's share of the data: worker `worker` of `num_workers` on rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


def split_items(items: Sequence[T], part: Part) -> tuple[list[T], int, int]:
    """Share `items` (shards or images) out among ranks, then among workers.

    Works like `wds.split_by_node` followed by `wds.split_by_worker`: each level takes every
    n-th item. When a level has fewer items than consumers, every consumer of that level keeps
    all items and takes every n-th *sample inside* each item instead, so no consumer is idle.

    Returns:
        (items of this part, stride, offset): keep sample number i of an item (counted inside
        the item) only when `i % stride == offset`.
    """
    kept, stride, offset = list(items), 1, 0
    for index, count in ((part.rank, part.world_size), (part.worker, part.num_workers)):
        if count <= 1:
            continue
        if len(kept) >= count:
            kept = kept[index::count]
        else:
            offset, stride = offset + stride * index, stride * count
    return kept, stride, offset


def ordered(items: Sequence[T], seed: int | None, epoch: int) -> list[T]:
    """`items` shuffled by (seed, epoch), identically on every rank; stored order when seed is None."""
    out = list(items)
    if seed is not None:
        random.Random(f"{seed}/{epoch}").shuffle(out)
    return out


def stable_id(key: str) -> int:
    """An int64 image id for a sample key: the key itself when numeric, else a hash."""
    if key.isdigit() and len(key) < 18:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def require_path(path: str | Path, where: str, *, kind: str = "file") -> Path:
    """`Path(path)` if it exists (as a `kind`: "file" or "folder"), else a `ConfigError` naming it."""
    p = Path(os.path.expanduser(str(path)))
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        raise ConfigError(f"{where}: {kind} not found: {p}")
    return p


def open_rgb(data: bytes | str | Path) -> Image.Image:
    """Decode an image (bytes or a path) fully into an RGB PIL image; raises on a bad file."""

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return im.convert("RGB")


def clean_captions(captions: object) -> list[str]:
    """The non-empty, stripped strings of a caption list (anything else is dropped)."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list | tuple):
        return []
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


class CaptionDataset:
    """Base class of the registered dataset classes (image-caption retrieval data)."""

    version: int = 0
    """Bump when the same arguments start to yield different data: it is part of the
    fingerprint of cached teacher outputs (`distill.training.cache`)."""

    def check(self) -> list[str]:
        """Problems found without reading everything, one line each naming the path."""
        return []

    def prepare(self) -> None:
        """Create the data if the dataset can (generation, conversion); called once per node."""

    def has_split(self, split: str) -> bool:
        """Whether `split` ("train", "val" or "test") has data."""
        raise NotImplementedError

    def content_signature(self, split: str = "train") -> dict[str, str]:
        """A cheap signature of every data file `split` reads: file (shard, JSON, image folder) -> signature.

        Part of the fingerprint of cached teacher outputs (`distill.training.cache`), which
        compares it file by file, so a cache built before a file changed is a miss naming
        that file. Readers sign a file by its size and modification time (`os.stat`, no
        reading: O(files), microseconds per file) rather than by hashing its bytes, which
        would read the whole dataset (hundreds of GB) before every run. An edit that keeps
        both size and mtime (a restore with `rsync -t`, `touch -d`) goes unnoticed; a copy
        that does not keep mtimes (`cp` without `-p`) is a miss although the bytes are the same.

        The base class signs nothing (data without files): only the dataset's name, args and
        `version` then tell caches apart.
        """
        return {}

    def train_size(self, captions_per_image: str) -> int | None:
        """Training samples in one pass (pairs under "all", images under "random"), if known."""
        return None

    def shards(self, split: str = "train") -> list[str] | None:
        """The shard URLs of `split` when its data is sharded (webdataset), else None; a sharded
        reader yields `SampleKey`s and implements `shard_images`."""
        return None

    def shard_images(self, url: str, skipped: Counter) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        """Every image of one shard of `shards()`, in stored order, as (key, id, image, captions)."""
        raise NotImplementedError(f"{type(self).__name__} is not sharded")

    def images(
        self, split: str, *, part: Part, seed: int | None, epoch: int, skipped: Counter
    ) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        """One pass over `part` of `split` as (key, image id, image, captions).

        Args:
            split: "train", "val" or "test".
            part: Which share to read.
            seed: Shuffle the order of shards/images with this seed and `epoch` (the same
                order on every rank, before splitting); None keeps the stored order.
            epoch: Mixed into the shuffle seed.
            skipped: Incremented by reason for every sample that cannot be used.
        """
        raise NotImplementedError

    def train_samples(
        self,
        *,
        part: Part = Part(),
        seed: int = 0,
        epoch: int = 0,
        captions_per_image: str = "all",
        skipped: Counter | None = None,
    ) -> Iterator[Sample]:
        """One shuffled pass over `part` of the training split, one sample per used caption.

        Args:
            part: Which share to read.
            seed: Base seed of the shard order and of the caption choice.
            epoch: Epoch number, mixed into both.
            captions_per_image: "all" (one sample per caption) or "random" (one random caption
                per image and epoch).
            skipped: Receives the skip counts; a fresh counter when None.
        """
        if captions_per_image not in TRAIN_MODES:
            raise ConfigError(
                f"data.captions_per_image: must be one of {TRAIN_MODES}, got {captions_per_image!r}"
            )
        skipped = Counter() if skipped is None else skipped
        for key, image_id, image, captions in self.images(
            "train", part=part, seed=seed, epoch=epoch, skipped=skipped
        ):
            if captions_per_image == "all":
                for i, caption in enumerate(captions):
                    yield with_shard(f"{key}/{i}", key), image_id, image, caption
            else:
                i = _choice(len(captions), f"{seed}/{epoch}/{key}")
                yield with_shard(f"{key}/{i}", key), image_id, image, captions[i]

    def eval_images(
        self, split: str, *, part: Part = Part(), skipped: Counter | None = None
    ) -> Iterator[EvalImage]:
        """Every image of `part` of `split` once, with all its captions, in stored order."""
        skipped = Counter() if skipped is None else skipped
        for _, image_id, image, captions in self.images(
            split, part=part, seed=None, epoch=0, skipped=skipped
        ):
            yield image_id, image, captions


def _choice(n: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") % n


def open_dataset(name: str, args: Mapping[str, Any] | None) -> CaptionDataset:
    """The registered dataset `name` constructed from `args`, checked against its signature.

    Raises:
        ConfigError: An unknown name (at `data.dataset`) or bad arguments (at `data.args`).
    """
    cls = DATASETS.get(name, "data.dataset")
    args = dict(args or {})
    problems = check_kwargs(cls, args, "data.args", f"dataset {name!r}")
    if problems:
        raise ConfigError(problems)
    return cls(**args)


def check_dataset(data_cfg: Any) -> CaptionDataset:
    """The dataset of a `data` config, after raising one `ConfigError` with every missing
    shard, file or folder (before training starts)."""
    dataset = open_dataset(data_cfg.dataset, data_cfg.args)
    problems = dataset.check()
    if problems:
        raise ConfigError(problems)
    return dataset
