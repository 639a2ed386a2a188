"""Retrieval evaluation of one encoder on a split of a config's dataset."""

from __future__ import annotations

import torch

from distill.config.schema import Config
from distill.data.base import check_dataset
from distill.data.loading import eval_loader
from distill.errors import ConfigError
from distill.eval.retrieval import encode_loader, retrieval_metrics
from distill.models.base import Encoder


def evaluate_encoder(
    encoder: Encoder, name: str, config: Config, split: str, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM of one encoder on a split of the config's dataset."""
    pre = {name: (encoder.image_preprocess(), encoder.text_preprocess())}
    dataset = check_dataset(config.data)
    loader = eval_loader(dataset, pre, split, batch_size=config.data.eval_batch_size, num_workers=config.data.num_workers)
    if loader is None:
        raise ConfigError(f"eval.split: dataset {config.data.dataset!r} has no {split!r} split")
    with torch.no_grad():
        image, image_ids, text, text_image_ids = encode_loader(encoder.to(device), loader, name, device)
    return retrieval_metrics(image, image_ids, text, text_image_ids, chunk_size=config.eval.chunk_size)
