"""Where `distill index build` reads images: a folder, webdataset shards, or a dataset split.

A SOURCE argument is, in this order of checks:

- an existing folder: every `jpg`/`jpeg`/`png`/`webp` file under it, recursively, sorted;
  the id is the path relative to the folder, the image is read back from its path;
- an existing `.tar` file, a brace pattern (`shards/{00000..00009}.tar`) or several joined
  by `::`: webdataset shards in the img2dataset layout (`{key}.jpg` + optional
  `{key}.json` / `{key}.txt` caption); the id is the sample key, the image is read back
  from `<shard>#<member>`;
- `DATASET:SPLIT` with a registered dataset (`synthetic:test`, the embedded benchmark,
  generated on first use), constructed from `--data-arg key=value` pairs; the id is the
  sample key and the image lives only in the index's thumbnail.

Unreadable images are skipped and counted by reason, never raised.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from distill.data.base import Part, clean_captions, open_dataset, open_rgb
from distill.data.webdataset import IMAGE_EXTS, check_urls, expand_urls, local_path
from distill.errors import ConfigError
from distill.registry import DATASETS

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class Item:
    """One image to index."""

    id: str
    location: str
    """Where to read the image back: a file path, `<shard>#<member>`, or `` (thumbnail only)."""
    caption: str
    image: Image.Image


@dataclass
class Skipped:
    """Images that could not be indexed: count per reason and a few examples."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(what)
        log.debug("skipping %s: %s", what, reason)

    def summary(self) -> str:
        """`3 unreadable image (a.jpg, b.jpg, ...)`, one reason after another; `` if none."""
        parts = []
        for reason, n in self.counts.items():
            more = ", ..." if n > len(self.examples[reason]) else ""
            parts.append(f"{n} {reason} ({', '.join(self.examples[reason])}{more})")
        return "; ".join(parts)


class FolderSource:
    """Every image file under a folder, recursively, in sorted order."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        )

    def __len__(self) -> int:
        return len(self.files)

    def items(self, skipped: Skipped) -> Iterator[Item]:
        for path in self.files:
            try:
                image = open_rgb(path)
            except Exception:  # PIL raises many types on corrupt data
                skipped.add("unreadable image", str(path))
                continue
            yield Item(path.relative_to(self.root).as_posix(), str(path), "", image)


def shard_caption(sample: dict[str, Any]) -> str:
    """The first caption of a webdataset sample (`json` captions/caption, else `txt`), or ``."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    captions = clean_captions(meta.get("captions")) or clean_captions(meta.get("caption"))
    if not captions and "txt" in sample:
        captions = clean_captions(sample["txt"].decode("utf-8", "replace"))
    return captions[0] if captions else ""


class ShardSource:
    """The images of webdataset shards, shard after shard, in stored order."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = [str(p.resolve()) if (p := local_path(u)) is not None else u for u in urls]

    def items(self, skipped: Skipped) -> Iterator[Item]:
        for url in self.urls:
            def handler(exn: Exception, url: str = url) -> bool:
                skipped.add("unreadable shard data", f"{url}: {exn}")
                return True

            for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                key = str(sample.get("__key__", ""))
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    skipped.add("sample without image", f"{url}#{key}")
                    continue
                try:
                    image = open_rgb(sample[ext])
                except Exception:  # PIL raises many types on corrupt data
                    skipped.add("unreadable image", f"{url}#{key}.{ext}")
                    continue
                yield Item(key, f"{url}#{key}.{ext}", shard_caption(sample), image)


class DatasetSource:
    """One split of a registered dataset (`synthetic:test`), in stored order."""

    def __init__(self, name: str, split: str, args: dict[str, Any]) -> None:
        self.name, self.split = name, split
        self.dataset = open_dataset(name, args)
        problems = self.dataset.check()
        if problems:
            raise ConfigError(problems)

    def items(self, skipped: Skipped) -> Iterator[Item]:
        self.dataset.prepare()
        if not self.dataset.has_split(self.split):
            raise ConfigError(f"SOURCE: dataset {self.name!r} has no {self.split!r} split")
        reasons: Counter = Counter()
        for key, _, image, captions in self.dataset.images(self.split, part=Part(), seed=None, epoch=0, skipped=reasons):
            yield Item(key, "", captions[0] if captions else "", image)
        for reason, n in reasons.items():
            skipped.counts[reason] += n
            skipped.examples.setdefault(reason, [])


Source = FolderSource | ShardSource | DatasetSource


def parse_source(source: str, data_args: dict[str, Any] | None = None) -> Source:
    """The reader a SOURCE argument names (see the module docstring).

    Raises:
        ConfigError: One line naming the source when it does not exist or cannot be read.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        found = FolderSource(path)
        if not len(found):
            raise ConfigError(f"SOURCE: no {'/'.join(IMAGE_EXTS)} image under {str(path)!r}")
        return found
    if path.is_file() and path.suffix == ".tar":
        return ShardSource([str(path)])
    if m := re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*):(\w+)", source):
        name, split = m.groups()
        DATASETS.get(name, "SOURCE")  # unknown name -> did-you-mean error
        if split not in SPLITS:
            raise ConfigError(f"SOURCE: {source!r}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        return DatasetSource(name, split, dict(data_args or {}))
    if "{" in source or "::" in source or source.endswith(".tar"):
        problems = check_urls(source, "SOURCE")
        if problems:
            raise ConfigError(problems)
        return ShardSource(expand_urls(source))
    if path.exists():
        raise ConfigError(f"SOURCE: {source!r} is neither an image folder nor a .tar shard")
    raise ConfigError(f"SOURCE: {source!r} does not exist (expected an image folder, .tar shards or DATASET:SPLIT such as synthetic:test)")


def read_image(location: str) -> Image.Image | None:
    """Read an indexed image back from its location (a path or `<shard>#<member>`); None if gone."""
    if not location:
        return None
    try:
        shard, sep, member = location.rpartition("#")
        if sep and shard.endswith(".tar") and Path(shard).is_file():
            with tarfile.open(shard) as tar:
                f = tar.extractfile(member)
                return open_rgb(f.read()) if f is not None else None
        return open_rgb(location)
    except Exception:  # a moved or broken file: the caller shows a placeholder
        return None
