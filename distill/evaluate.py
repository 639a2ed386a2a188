"""Retrieval evaluation of any model of a config or of a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.config import Config, load_config
from distill.errors import ConfigError
from distill.models.base import Encoder


def evaluate_encoder(
    encoder: Encoder, name: str, config: Config, split: str, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM of one encoder on a split of the config's dataset."""
    from distill.data.datamodule import DistillDataModule
    from distill.eval.retrieval import encode_loader, retrieval_metrics

    pre = {name: (encoder.image_preprocess(), encoder.text_preprocess())}
    data = DistillDataModule(config.data, pre, pre)
    data.check()
    loader = data.eval_dataloader(split)
    if isinstance(loader, list):  # the dataset has no such split
        raise ConfigError(f"eval.split: dataset {config.data.dataset!r} has no {split!r} split")
    with torch.no_grad():
        image, image_ids, text, text_image_ids = encode_loader(encoder.to(device), loader, name, device)
    return retrieval_metrics(image, image_ids, text, text_image_ids, chunk_size=config.eval.chunk_size)


def load_checkpoint(path: str | Path, overrides: list[str] | None = None) -> Any:
    """A `DistillModule` rebuilt from a `distill fit` checkpoint (its saved config, plus overrides)."""
    from omegaconf import OmegaConf

    from distill.config import config_from_raw, parse_overrides
    from distill.module import DistillModule

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved = ckpt.get("hyper_parameters", {}).get("config")
    if saved is None:
        raise ConfigError(f"{path}: not a distill checkpoint (no hyper_parameters.config)")
    raw = OmegaConf.create(saved)
    if overrides:
        raw = OmegaConf.merge(raw, parse_overrides(overrides))
    module = DistillModule(config_from_raw(raw))
    module.load_state_dict(ckpt["state_dict"])
    return module


def evaluate_target(
    target: str, overrides: list[str] | None = None, *, model: str | None = None, split: str | None = None
) -> dict[str, float]:
    """`distill eval`: a config (evaluating a model as loaded) or a checkpoint (as trained)."""
    from distill.build import build_graph

    if target.endswith(".ckpt"):
        module = load_checkpoint(target, overrides)
        config, graph = module.config, module.graph
    else:
        config = load_config(target, overrides)
        if model:
            config.eval.model = model
        graph = build_graph(config)
    name = model or config.eval.model
    if name not in graph.models:
        raise ConfigError(f"--model: {name!r} is not a loaded model; loaded: {', '.join(graph.models)}")
    return evaluate_encoder(graph.models[name], name, config, split or config.eval.split)
