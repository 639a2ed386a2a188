"""The mined-negatives file: one `torch.save` of plain containers and tensors.

Written by `distill index mine` (or a stage's `build_index`), read with `weights_only=True`:

    kind       "distill-negatives"
    version    1
    model      name of the model that embedded the corpus
    k          negatives mined per sample and direction
    keys       N sample keys `<image key>/<caption index>` (every caption of every training
               image, in the dataset's stored order)
    image_ids  (N,) int64 image id of each sample
    image      (N, D) float32 embedding of each sample's image (repeated across its captions)
    text       (N, D) float32 embedding of each sample's caption
    i2t        (N, k) int64: the samples whose captions score highest against sample i's
               image, best first, never one of the same image id
    t2i        (N, k) int64: the hardest images for sample i's caption, best first, one
               sample per image (its first caption's row), never one of the same image id

Not to be confused with the search index of `distill index build` (`distill.deploy.search_index`),
a different format with its own reader; each reader refuses the other's file by its `kind`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError
from distill.io import atomic_path

KIND = "distill-negatives"
VERSION = 1
FIELDS = ("version", "model", "k", "keys", "image_ids", "image", "text", "i2t", "t2i")


def save_negatives(negatives: dict[str, Any], path: str | Path) -> Path:
    """Write a negatives file atomically (a killed run never leaves a truncated file)."""
    with atomic_path(path) as tmp:
        torch.save({"kind": KIND, **{k: negatives[k] for k in FIELDS}}, tmp)
    return Path(path)


def load_negatives(path: str | Path) -> dict[str, Any]:
    """Read a file written by `save_negatives`.

    Raises:
        ConfigError: If the file is missing, unreadable or not a negatives file.
    """
    where = f"negatives file {str(path)!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file; mine it with `distill index mine` or a stage's build_index")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of many types: the file is damaged
        raise ConfigError(f"{where}: unreadable ({type(e).__name__}); mine it again with `distill index mine`") from e
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "distill-search-index":
        raise ConfigError(f"{where}: a search index (`distill index build`), not mined negatives (`distill index mine`)")
    missing = [f for f in FIELDS if f not in data] if isinstance(data, dict) else list(FIELDS)
    if missing:
        raise ConfigError(f"{where}: not a distill negatives file (missing {', '.join(missing)})")
    return data
