"""`fit`: train one run (a config without `stages`) end to end, resumably.

A staged config is run by `distill.training.stages.run_stages`, which calls `fit` per
stage; `train` picks one or the other for the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl

from distill.config.load import to_yaml
from distill.config.schema import Config
from distill.core.build import build_graph
from distill.data.base import check_dataset
from distill.distributed import is_rank_zero
from distill.io import write_json, write_text
from distill.negatives.refresh import attach_negatives
from distill.training.cache.store import resolve_cache
from distill.training.module import DistillModule
from distill.training.trainer import make_datamodule, make_trainer, quiet_lightning, resume_path


def fit(
    config: Config, *, prepare: Callable[[DistillModule], list[pl.Callback]] | None = None
) -> tuple[dict[str, float], DistillModule]:
    """Train a stage-less config end to end.

    Args:
        config: A validated config.
        prepare: Called with the built module before training (e.g. to load weights and
            freeze parameters); returns extra callbacks.

    Returns:
        The final validation metrics (also written to `metrics.json`) and the trained module.
    """
    if config.stages:
        raise ValueError("fit trains one run; a config with stages runs through distill.training.stages.run_stages")
    quiet_lightning()
    out = Path(config.output_dir)
    check_dataset(config.data)
    ckpt = resume_path(config, out)
    cached = resolve_cache(config)  # teacher nodes read from a matching cache, not computed
    pl.seed_everything(config.seed, workers=True, verbose=False)
    module = DistillModule(config, graph=build_graph(config, cached))
    data = make_datamodule(config, module)
    callbacks = (prepare(module) if prepare else []) + attach_negatives(config, module.graph)
    trainer = make_trainer(config, out, callbacks)
    if is_rank_zero():
        write_text(out / "config.yaml", to_yaml(config))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    trainer.save_checkpoint(out / "final.ckpt")  # collective: every rank calls it
    if is_rank_zero():
        for name, folder in config.save_pretrained.items():
            module.graph.models[name].save_pretrained(folder)
        write_json(out / "metrics.json", metrics, sort_keys=True)
    return metrics, module
