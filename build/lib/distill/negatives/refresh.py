"""Attaching mined negatives to the `hard_negative` edges before training, and refreshing
them during training.

`attach_negatives` (called by `fit`) reads each enabled edge's negatives file and hands it
to the loss, so a missing file fails before training; losses never open files. For an edge
with `refresh_every`, `NegativesRefresh` re-embeds the corpus with the current weights of
the model that built the file and re-mines every `refresh_every` steps (each DDP rank
computes the same negatives; rank 0 rewrites the file, so a resumed run continues with the
latest one).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

from distill.config.schema import Config
from distill.distributed import is_rank_zero
from distill.errors import ConfigError
from distill.losses.hard_negative import HardNegative
from distill.negatives.mine import mine_negatives
from distill.negatives.store import load_negatives, save_negatives

log = logging.getLogger(__name__)


def hard_negative_edges(graph: Any) -> dict[str, Any]:
    """Enabled `hard_negative` edges of a graph: edge name -> loss."""
    return {e.name: e.loss for e in graph.enabled_edges() if isinstance(e.loss, HardNegative)}


def attach_negatives(config: Config, graph: Any) -> list[pl.Callback]:
    """Load the negatives of every enabled `hard_negative` edge before training; refresh callbacks.

    Raises:
        ConfigError: One line per edge whose negatives file is missing, too shallow or not refreshable.
    """
    problems, callbacks = [], []
    for name, loss in hard_negative_edges(graph).items():
        path = f"edges.{name}.args"
        try:
            index = load_negatives(loss.index_path)
            loss.set_negatives(index)
        except ConfigError as e:
            problems += [f"{path}.index: {p}" for p in e.problems]
            continue
        except ValueError as e:
            problems.append(f"{path}.k: {e}")
            continue
        if loss.refresh_every is None:
            continue
        model = index["model"]
        if model not in graph.models or model in graph.frozen:
            why = "is frozen, so its index never changes" if model in graph.frozen else "is not loaded by this run"
            problems.append(f"{path}.refresh_every: the index was built by model {model!r}, which {why}")
            continue
        callbacks.append(NegativesRefresh(edge=name, model=model, data_cfg=config.data, every=loss.refresh_every, k=int(index["k"])))
    if problems:
        raise ConfigError(problems)
    return callbacks


class NegativesRefresh(pl.Callback):
    """Every `every` steps, re-mine an edge's negatives with the current weights of `model`.

    Args:
        edge: The `hard_negative` edge whose index is refreshed.
        model: The model of the graph that embeds the corpus.
        data_cfg: The run's `data` config.
        every: Steps between refreshes.
        k: Negatives to mine.
    """

    def __init__(self, *, edge: str, model: str, data_cfg: Any, every: int, k: int) -> None:
        self.edge, self.model, self.data_cfg, self.every, self.k = edge, model, data_cfg, every, k
        self.refreshed: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or step in self.refreshed or step >= trainer.max_steps:
            return
        graph = pl_module.graph
        loss = graph.losses[self.edge]
        index = mine_negatives(graph.models[self.model], self.model, self.data_cfg, k=self.k, device=pl_module.device)
        loss.set_negatives(index)
        if is_rank_zero():
            save_negatives(index, loss.index_path)
        self.refreshed.append(step)
        log.info("re-mined the negatives of edge %s at step %d", self.edge, step)
