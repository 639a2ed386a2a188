"""Encoding the training split with a frozen teacher for the cache (`distill cache`): the
chunks of images (and their V views) and captions, and one rank's part of a global-layout
entry (`build` merges the parts; `shards` writes per shard)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.augment import AugmentSpec
from distill.config.schema import Config
from distill.data.base import CaptionDataset, Part, open_dataset
from distill.data.loading import Collator
from distill.errors import ConfigError
from distill.models.base import Encoder
from distill.training.progress import CountProgress


class ImageStream(IterableDataset):
    """(image keys, image inputs, sample keys, text inputs) of one rank's training images,
    in stored order, each worker a disjoint share."""

    def __init__(self, dataset: CaptionDataset, collator: Collator, batch_size: int, rank: int, world: int) -> None:
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[list[str], dict, list[str], dict]]:
        info = get_worker_info()
        part = Part(self.rank, self.world, info.id if info else 0, info.num_workers if info else 1)
        yield from encoder_inputs(self.dataset.images("train", part=part, seed=None, epoch=0, skipped=Counter()),
                                  self.collator, self.batch_size)

def encoder_inputs(items: Iterator[tuple[str, int, Any, list[str]]], collator: Collator,
                   batch_size: int) -> Iterator[tuple[list[str], dict, list[str], dict]]:
    """(image keys, image inputs, sample keys, text inputs) per chunk of `batch_size` images;
    with augmented views (`collator.augment.views` = V) the image inputs hold V rows per image,
    image-major (image 0's views 0..V-1, then image 1's)."""
    views = collator.augment.views if collator.augment is not None else None
    for chunk in wds.batched(batch_size, collation_fn=list, partial=True)(items):
        captions = [(f"{key}/{i}", c) for key, _, _, caps in chunk for i, c in enumerate(caps)]
        keys, images = [key for key, _, _, _ in chunk], [image for _, _, image, _ in chunk]
        if views is None:
            pixels = collator.images(images)
        else:
            pixels = collator.views([im for im in images for _ in range(views)],
                                    [k for k in keys for _ in range(views)], list(range(views)) * len(keys))
        yield keys, pixels, [k for k, _ in captions], collator.texts([c for _, c in captions])

def encode_part(
    config: Config, model: Encoder, outputs: list[str], parts: Path, *, rank: int, world: int,
    batch_size: int | None = None, name: str = "teacher",
) -> None:
    """Encode this rank's share of the training split into `parts/` (fp16 rows + keys).

    Raises:
        ConfigError: If the model (`models.<name>`) gives a row that is not finite in fp16.
    """
    dataset = open_dataset(config.data.dataset, config.data.args)
    dataset.prepare()  # generates the embedded data once (locked), a no-op for files
    parts.mkdir(parents=True, exist_ok=True)
    pre = {"m": (model.image_preprocess() if "image" in outputs else None,
                 model.text_preprocess() if "text" in outputs else None)}
    collator = Collator(pre, AugmentSpec.from_config(config.data.augment))
    stream = ImageStream(dataset, collator, batch_size or config.data.eval_batch_size, rank, world)
    loader = DataLoader(stream, batch_size=None, num_workers=config.data.num_workers)
    files = {o: open(parts / f"{o}.rank{rank}.f16", "wb") for o in outputs}
    keys: dict[str, list[str]] = {o: [] for o in outputs}
    try:
        with torch.no_grad():
            images_total = dataset.train_size("random")
            shown = CountProgress(f"cache: models.{name} outputs", images_total // world if images_total else None,
                                  "image")
            for image_keys, images, sample_keys, texts in loader:
                shown.update(len(image_keys))
                for output in outputs:
                    batch_keys = image_keys if output == "image" else sample_keys
                    rows = encode_rows(model, output, images if output == "image" else texts, batch_keys, name)
                    files[output].write(rows.tobytes())
                    keys[output].extend(batch_keys)
            shown.close()
    finally:
        for f in files.values():
            f.close()
    for output in outputs:
        np.save(parts / f"{output}.rank{rank}.keys.npy", np.array([k.encode() for k in keys[output]], dtype="S")
                if keys[output] else np.array([], dtype="S1"))

def encode_rows(model: Encoder, output: str, inputs: dict[str, dict[str, torch.Tensor]], keys: list[str],
                name: str) -> np.ndarray:
    """(len(keys), width) fp16 rows of one output for a chunk (V views of an image: one row of
    V x D, view-major), on the model's device and dtype.

    Raises:
        ConfigError: If a row is not finite in fp16 (never stored, so a non-finite value read
            later is damage).
    """
    param = next(model.parameters())
    moved = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs["m"].items()}
    with np.errstate(over="ignore"):  # an overflow is refused just below, with its key
        rows = model.encode(output, moved).float().cpu().numpy().astype(np.float16).reshape(len(keys), -1)
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise ConfigError(
            f"models.{name}: its {output} output for {keys[bad[0]]!r} is not finite in fp16 "
            "(NaN, or beyond 65504): it cannot be cached; set cache.mode=never"
        )
    return rows
