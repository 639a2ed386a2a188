"""Retrieval evaluation of one encoder on a split of a config's dataset, with the per-query
ranks kept beside the recalls (`eval_<split>.json` + `eval_<split>.ranks.npz`), so that
runs can be compared query by query (`distill.eval.stats`) without re-encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config.schema import Config
from distill.data.base import check_dataset
from distill.data.loading import eval_loader
from distill.errors import ConfigError
from distill.eval.retrieval import encode_loader, recalls_from_ranks, retrieval_ranks
from distill.io import atomic_path, write_json
from distill.models.base import Encoder


def evaluate_ranks(
    encoder: Encoder, name: str, config: Config, split: str, device: str | torch.device = "cpu"
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """R@1/5/10 both ways and RSUM of one encoder on a split, and the per-query ranks
    (`{"i2t", "t2i"}`, int32, plus the `image_ids` and `text_image_ids` they belong to)."""
    pre = {name: (encoder.image_preprocess(), encoder.text_preprocess())}
    dataset = check_dataset(config.data)
    loader = eval_loader(dataset, pre, split, batch_size=config.data.eval_batch_size, num_workers=config.data.num_workers)
    if loader is None:
        raise ConfigError(f"eval.split: dataset {config.data.dataset!r} has no {split!r} split")
    with torch.no_grad():
        image, image_ids, text, text_image_ids = encode_loader(encoder.to(device), loader, name, device)
        ranks = retrieval_ranks(image, image_ids, text, text_image_ids, chunk_size=config.eval.chunk_size)
    kept = {k: v.numpy() for k, v in ranks.items()}
    kept.update(image_ids=image_ids.cpu().numpy(), text_image_ids=text_image_ids.cpu().numpy())
    return recalls_from_ranks(ranks), kept


def evaluate_encoder(
    encoder: Encoder, name: str, config: Config, split: str, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM of one encoder on a split of the config's dataset."""
    return evaluate_ranks(encoder, name, config, split, device)[0]


def save_evaluation(folder: str | Path, split: str, metrics: dict[str, float], ranks: dict[str, np.ndarray]) -> Path:
    """Write `eval_<split>.json` and `eval_<split>.ranks.npz` into `folder`; returns the JSON."""
    folder = Path(folder)
    with atomic_path(folder / f"eval_{split}.ranks.npz") as tmp:
        np.savez(tmp, **{k: np.asarray(v) for k, v in ranks.items()})
    return write_json(folder / f"eval_{split}.json", metrics, sort_keys=True)


def load_ranks(folder: str | Path, split: str) -> dict[str, Any]:
    """The per-query ranks a run folder holds for `split`.

    Raises:
        ConfigError: If the folder has no evaluation of that split.
    """
    path = Path(folder) / f"eval_{split}.ranks.npz"
    if not path.is_file():
        raise ConfigError(f"{folder}: no per-query ranks of the {split!r} split ({path.name}); evaluate it first "
                          "(`distill eval CKPT --split ...` or `distill sweep`)")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
