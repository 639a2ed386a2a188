"""The Lightning data module: a registered dataset -> batches preprocessed for every model.

Skipped samples (bad images, empty captions) are counted in the loader workers, travel to
the main process as a `skipped` attribute of each batch, and are summed into
`DistillDataModule.skipped` by the `on_before_batch_transfer` hook, where the LightningModule
reads them (`trainer.datamodule.skipped_total("train")`) to log `train/skipped`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from distill.augment import AugmentSpec
from distill.batch import Batch
from distill.data.base import TRAIN_MODES, open_dataset
from distill.data.loading import Collator, EpochLoader, Preprocess, TrainStream, eval_loader
from distill.distributed import launch_world, rank
from distill.errors import ConfigError

log = logging.getLogger(__name__)


class DistillDataModule(pl.LightningDataModule):
    """Train/val/test loaders of a registered dataset, preprocessed for every running model.

    Args:
        data_cfg: Any object with `dataset`, `args`, `batch_size`, `eval_batch_size`,
            `num_workers`, `shuffle_buffer`, `captions_per_image` ("all" | "random"), `seed`
            and `steps_per_epoch` (batches per epoch and rank; None = one pass).
        preprocess: Model name -> its (image, text) preprocessing, for training.
        eval_preprocess: The same for evaluation; defaults to `preprocess`.
    """

    def __init__(
        self, data_cfg: Any, preprocess: Preprocess, eval_preprocess: Preprocess | None = None
    ) -> None:
        super().__init__()
        if data_cfg.captions_per_image not in TRAIN_MODES:
            raise ConfigError(
                f"data.captions_per_image: must be one of {', '.join(TRAIN_MODES)}, got {data_cfg.captions_per_image!r}"
            )
        self.cfg = data_cfg
        self.dataset = open_dataset(data_cfg.dataset, data_cfg.args)
        augment = getattr(data_cfg, "augment", None)  # training views (`distill.augment`); eval never augments
        self.train_collator = Collator(preprocess, AugmentSpec.from_config(augment) if augment else None, data_cfg.seed)
        self.eval_preprocess = eval_preprocess if eval_preprocess is not None else preprocess
        self.skipped: Counter[str] = Counter()
        """`<split>/<reason>` -> samples skipped so far on this rank (filled by `on_before_batch_transfer`)."""
        self._epochs = 0
        self._train_loader: EpochLoader | None = None
        if data_cfg.num_workers > 0:  # HF tokenizers warn (and may deadlock) when used after a fork
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def check(self) -> None:
        """Raise a `ConfigError` with every problem the dataset finds in its files."""
        problems = self.dataset.check()
        if problems:
            raise ConfigError(problems)

    def prepare_data(self) -> None:
        self.dataset.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.dataset.prepare()  # a no-op once `prepare_data` has run on this node

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size), as `distill.distributed` answers it (the process group
        Lightning has set up by the time loaders are made, else the launcher's environment)."""
        return rank(), launch_world()

    def steps_per_epoch(self) -> int | None:
        """Training batches per epoch and rank: the configured value, else (under DDP) one pass worth."""
        if self.cfg.steps_per_epoch is not None:
            return int(self.cfg.steps_per_epoch)
        world = self.rank_and_world()[1]
        if world == 1:
            return None
        size = self.dataset.train_size(self.cfg.captions_per_image)
        if size is None:
            log.warning(
                "data.steps_per_epoch is unset and the dataset size is unknown: ranks may see different batch counts"
            )
            return None
        return max(1, size // (world * self.cfg.batch_size))

    def _next_epoch(self) -> int:
        if self.trainer is not None:
            return self.trainer.current_epoch
        self._epochs += 1
        return self._epochs - 1

    def train_dataloader(self) -> DataLoader:
        self.dataset.prepare()
        rank, world = self.rank_and_world()
        stream = TrainStream(
            dataset=self.dataset,
            collator=self.train_collator,
            batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer,
            captions_per_image=self.cfg.captions_per_image,
            seed=self.cfg.seed,
            steps=self.steps_per_epoch(),
            rank=rank,
            world_size=world,
        )
        persistent = bool(getattr(self.cfg, "persistent_workers", False))
        self._train_loader = EpochLoader(
            stream,
            epoch_fn=self._next_epoch,
            num_workers=self.cfg.num_workers,
            persistent_workers=persistent,
            seed=self.cfg.seed,
        )
        return self._train_loader

    def eval_dataloader(self, split: str) -> DataLoader | list:
        """Loader of `split` ("val" or "test"); an empty list when the dataset has no such split."""
        rank, world = self.rank_and_world()
        loader = eval_loader(self.dataset, self.eval_preprocess, split, batch_size=self.cfg.eval_batch_size,
                             num_workers=self.cfg.num_workers, rank=rank, world_size=world)
        return [] if loader is None else loader

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader("test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Move the skip counts that came with `batch` from the workers into `self.skipped`;
        count the training batches used (the resume position of `EpochLoader`)."""
        if isinstance(batch, Batch) and self._train_loader is not None:
            self._train_loader.consumed += 1
        counts = getattr(batch, "skipped", None)
        if counts is not None:
            self.skipped.update(counts)
            del batch.skipped
        return batch

    def skipped_total(self, split: str = "train") -> int:
        """Samples of `split` skipped so far on this rank (log it as `train/skipped`)."""
        return sum(v for k, v in self.skipped.items() if k.startswith(f"{split}/"))
