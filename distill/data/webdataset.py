"""Reading image-caption shards in the img2dataset / webdataset layout.

Each sample of a shard is `{key}.jpg` (or png/webp) plus `{key}.json` with a `captions`
list or a `caption`, and/or `{key}.txt`. Samples whose image cannot be decoded or whose
captions are all empty are skipped and counted by reason, never raised: one bad file must
not end an epoch of a 3M-image run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from distill.data.base import (
    CaptionDataset,
    Part,
    SampleKey,
    clean_captions,
    open_rgb,
    ordered,
    split_items,
    stable_id,
)
from distill.registry import DATASETS

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SPLIT_ARGS = {"train": "urls", "val": "val_urls", "test": "test_urls"}


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; `::` joins several patterns (as in webdataset)."""
    return [url for part in pattern.split("::") if part for url in braceexpand(part)]


def local_path(url: str) -> Path | None:
    """The file a shard URL names (plain path or `file:`), or None for a remote/pipe URL."""
    if url.startswith("file:"):
        return Path(url[len("file:") :])
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", url):  # http:, https:, pipe:, s3:, gs:, ...
        return None
    return Path(url).expanduser()


def check_urls(pattern: str | None, where: str) -> list[str]:
    """One line per problem with a shard pattern: nothing matches, or some local shards are missing."""
    if pattern is None:
        return []
    try:
        urls = expand_urls(pattern)
    except Exception as e:  # braceexpand raises on unbalanced braces
        return [f"{where}: cannot expand {pattern!r}: {e}"]
    if not urls:
        return [f"{where}: the pattern {pattern!r} names no shard"]
    missing = [u for u in urls if (p := local_path(u)) is not None and not p.is_file()]
    if not missing:
        return []
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if len(missing) == len(urls):
        return [f"{where}: no file matches {pattern} (missing {shown})"]
    return [
        f"{where}: {len(missing)} of {len(urls)} files of {pattern} are missing (missing {shown})"
    ]


def file_signature(path: str | os.PathLike[str]) -> str:
    """`"<size>:<mtime_ns>"` of a file from one `os.stat` (its bytes are not read), or "missing"."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _handler(url: str, skipped: Counter) -> Callable[[Exception], bool]:
    def handle(exn: Exception) -> bool:
        skipped["unreadable_shard"] += 1
        log.warning("skipping unreadable data in %s: %s", url, exn)
        return True

    return handle


def decode_sample(sample: dict, skipped: Counter) -> tuple[str, int, Image.Image, list[str]] | None:
    """A raw webdataset sample -> (key, image id, RGB image, captions), or None (counted in `skipped`)."""
    key = str(sample.get("__key__", ""))
    meta: object = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            skipped["bad_json"] += 1
    meta = meta if isinstance(meta, dict) else {}
    captions = clean_captions(meta.get("captions")) or clean_captions(meta.get("caption"))
    if not captions and "txt" in sample:
        captions = clean_captions(sample["txt"].decode("utf-8", "replace"))
    if not captions:
        skipped["empty_caption"] += 1
        return None
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        skipped["missing_image"] += 1
        return None
    try:
        image = open_rgb(data)
    except Exception:  # PIL raises many types on corrupt data
        skipped["undecodable_image"] += 1
        return None
    image_id = meta.get("image_id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        image_id = stable_id(str(meta.get("key") or key))
    return key, image_id, image, captions


def read_shards(
    urls: list[str], *, stride: int = 1, offset: int = 0, skipped: Counter
) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
    """Decoded samples of `urls` in order, keeping sample i of each shard when `i % stride == offset`;
    keys are `SampleKey`s that know their shard."""
    for url in urls:
        samples = wds.tarfile_samples([{"url": url}], handler=_handler(url, skipped))
        for i, sample in enumerate(samples):
            if i % stride == offset and (decoded := decode_sample(sample, skipped)) is not None:
                key, image_id, image, captions = decoded
                yield SampleKey(key, url), image_id, image, captions


@DATASETS.register("webdataset")
class WebDatasetShards(CaptionDataset):
    """Image-caption tar shards (img2dataset output: CC3M, CC12M, LAION, the synthetic set).

    Args:
        urls: Brace-expanded training shards: local paths, `file:`, `http(s)://` or `pipe:`
            URLs, e.g. `/data/cc3m/{00000..00331}.tar`.
        val_urls: Validation shards, same syntax; None for no validation split.
        test_urls: Test shards; None for no test split.
        num_samples: Training samples in one pass (image-caption pairs when every caption is
            used, images under `captions_per_image: random`); sizes epochs under DDP.
    """

    def __init__(
        self,
        *,
        urls: str,
        val_urls: str | None = None,
        test_urls: str | None = None,
        num_samples: int | None = None,
    ) -> None:
        self.patterns = {"train": urls, "val": val_urls, "test": test_urls}
        self.num_samples = num_samples

    def check(self) -> list[str]:
        """Missing local shards, one line per pattern."""
        return [
            line
            for split, arg in SPLIT_ARGS.items()
            for line in check_urls(self.patterns[split], f"data.args.{arg}")
        ]

    def has_split(self, split: str) -> bool:
        return bool(self.patterns[split])

    def train_size(self, captions_per_image: str) -> int | None:
        return self.num_samples

    def content_signature(self, split: str = "train") -> dict[str, str]:
        """Shard URL -> `file_signature` (size and mtime: one stat per shard, no reading).

        A remote shard (`http:`, `pipe:`, `s3:`...) is signed "remote": its content cannot
        be known without fetching it, so only its URL (in the args) tells caches apart.
        """
        try:
            urls = expand_urls(self.patterns[split] or "")
        except Exception:  # braceexpand raises on unbalanced braces (`check` reports it)
            return {}
        return {url: "remote" if (p := local_path(url)) is None else file_signature(p) for url in urls}

    def shards(self, split: str = "train") -> list[str] | None:
        return expand_urls(self.patterns[split] or "")

    def shard_images(self, url: str, skipped: Counter) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        return read_shards([url], skipped=skipped)

    def images(
        self, split: str, *, part: Part, seed: int | None, epoch: int, skipped: Counter
    ) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        pattern = self.patterns[split]
        if not pattern:
            return
        shards, stride, offset = split_items(ordered(expand_urls(pattern), seed, epoch), part)
        yield from read_shards(shards, stride=stride, offset=offset, skipped=skipped)
