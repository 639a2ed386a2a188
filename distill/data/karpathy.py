"""Reading a Karpathy-split JSON (Flickr30K, MSCOCO, the synthetic set) and its image folder.

The JSON is `{"images": [{"filename", "filepath"?, "imgid", "split", "sentences": [{"raw",
"tokens"}]}]}`; an image lives at `image_root/filepath/filename`. The "restval" split
(MSCOCO) counts as training data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from distill.data.base import (
    CaptionDataset,
    Part,
    clean_captions,
    open_rgb,
    ordered,
    require_path,
    split_items,
)
from distill.data.webdataset import file_signature
from distill.errors import ConfigError
from distill.registry import DATASETS

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class KarpathyImage:
    """One image entry of the JSON."""

    key: str
    image_id: int
    path: str
    captions: list[str]


def load_karpathy(json_path: str | Path, image_root: str | Path) -> dict[str, list[KarpathyImage]]:
    """Split -> its images; a missing or malformed JSON raises a `ConfigError` naming the file."""
    path = require_path(json_path, "data.args.json_path")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["images"]
        out: dict[str, list[KarpathyImage]] = {"train": [], "val": [], "test": []}
        for i, img in enumerate(entries):
            split = SPLITS.get(img["split"])
            if split is None:
                continue
            sentences = [s.get("raw") or " ".join(s.get("tokens", [])) for s in img["sentences"]]
            file = os.path.join(str(image_root), img.get("filepath", ""), img["filename"])
            image_id = int(img.get("imgid", i))
            out[split].append(
                KarpathyImage(Path(img["filename"]).stem, image_id, file, clean_captions(sentences))
            )
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"data.args.json_path: {path} is not a Karpathy-split JSON ({type(e).__name__}: {e})"
        ) from e
    return out


@DATASETS.register("karpathy")
class KarpathySplits(CaptionDataset):
    """Images and captions from a Karpathy-split JSON such as `dataset_flickr30k.json`.

    Args:
        json_path: The JSON file (`dataset_flickr30k.json`, `dataset_coco.json`, ...).
        image_root: Folder that `filepath/filename` of each entry is relative to.
    """

    def __init__(self, *, json_path: str, image_root: str) -> None:
        self.json_path = json_path
        self.image_root = image_root
        self._splits: dict[str, list[KarpathyImage]] | None = None

    def splits(self) -> dict[str, list[KarpathyImage]]:
        """The parsed JSON, loaded on first use."""
        if self._splits is None:
            self._splits = load_karpathy(self.json_path, self.image_root)
        return self._splits

    def check(self) -> list[str]:
        """A missing or malformed JSON, a missing image folder, and missing image files."""
        try:
            require_path(self.image_root, "data.args.image_root", kind="folder")
            splits = self.splits()
        except ConfigError as e:
            return e.problems
        missing = [im.path for ims in splits.values() for im in ims if not os.path.isfile(im.path)]
        if not missing:
            return []
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return [
            f"data.args.image_root: {len(missing)} images of {self.json_path} are missing: {', '.join(missing[:3])}{more}"
        ]

    def has_split(self, split: str) -> bool:
        return bool(self.splits()[split])

    def content_signature(self, split: str = "train") -> dict[str, str]:
        """The JSON file and each folder of `split`'s images -> a signature.

        The JSON is signed by `file_signature` (size, mtime). An image folder is signed by
        `"<n> images <digest>"`, the digest over every image of the split in it (file name,
        size, mtime): one stat per image (about 1 s per 100k images on a local disk), no
        reading, so an image replaced under the same name changes its folder's signature.
        Images of the other splits are not signed (they are never cached). A JSON that
        cannot be parsed signs only the JSON (`check` reports it).
        """
        path = Path(self.json_path).expanduser()
        out = {str(path): file_signature(path)}
        try:
            images = sorted(self.splits()[split], key=lambda im: im.path)
        except ConfigError:
            return out
        folders: dict[str, list[str]] = {}
        for im in images:
            folder, name = os.path.split(im.path)
            folders.setdefault(folder, []).append(f"{name}\0{file_signature(im.path)}\n")
        for folder, lines in folders.items():
            digest = hashlib.sha256("".join(lines).encode()).hexdigest()[:20]
            out[folder] = f"{len(lines)} images {digest}"
        return out

    def train_size(self, captions_per_image: str) -> int | None:
        train = self.splits()["train"]
        return (
            len(train) if captions_per_image == "random" else sum(len(im.captions) for im in train)
        )

    def images(
        self, split: str, *, part: Part, seed: int | None, epoch: int, skipped: Counter
    ) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        entries, stride, offset = split_items(ordered(self.splits()[split], seed, epoch), part)
        if offset:  # fewer images than consumers: sample 0 of each image goes to offset 0 only
            return
        for im in entries:
            if not im.captions:
                skipped["empty_caption"] += 1
                continue
            try:
                image = open_rgb(im.path)
            except FileNotFoundError:
                skipped["missing_image"] += 1
                continue
            except Exception:  # PIL raises many types on corrupt data
                skipped["undecodable_image"] += 1
                continue
            yield im.key, im.image_id, image, im.captions
