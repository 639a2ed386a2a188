"""Batches from a dataset: per-model preprocessing, shuffling and splitting among workers.

Preprocessing runs in the loader workers, once per distinct `ImagePreprocess.key()` and
`TextPreprocess.key()`; models that agree on a key get the same tensor object (identity
survives the pickling between worker and main process). Each batch carries the skip counts
of its worker since the previous batch as a `skipped` attribute.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.augment import AugmentSpec, draw_view, pick_view
from distill.batch import Batch, ModelInputs, RetrievalBatch
from distill.data.base import CaptionDataset, EvalImage, Part, Sample
from distill.errors import ConfigError
from distill.models.base import ImagePreprocess, TextPreprocess

log = logging.getLogger(__name__)
T = TypeVar("T")
Preprocess = dict[str, tuple[ImagePreprocess | None, TextPreprocess | None]]
"""Model name -> (image preprocessing, text preprocessing) of that model."""


class Collator:
    """Turns samples into `Batch`/`RetrievalBatch`, preprocessing once per distinct key.

    Args:
        preprocess: Model name -> (image preprocessing, text preprocessing); None where the
            model reads no images (or no text).
        augment: Training augmentation: `train_batch` shows each row's image as one view
            (`distill.augment`) to every model, each at its own size; evaluation never augments.
        data_seed: Seeds which view a sample uses in an epoch (`data.seed`).
    """

    def __init__(self, preprocess: Preprocess, augment: AugmentSpec | None = None, data_seed: int = 0) -> None:
        self.models = list(preprocess)
        self.augment, self.data_seed = augment, data_seed
        self.image_groups: dict[tuple, tuple[ImagePreprocess, list[str]]] = {}
        self.text_groups: dict[tuple, tuple[TextPreprocess, list[str]]] = {}
        for model, (image_pp, text_pp) in preprocess.items():
            if image_pp is not None:
                self.image_groups.setdefault(image_pp.key(), (image_pp, []))[1].append(model)
            if text_pp is not None:
                self.text_groups.setdefault(text_pp.key(), (text_pp, []))[1].append(model)

    def images(self, images: Sequence[Any]) -> dict[str, ModelInputs]:
        """Model -> {"pixel_values": (N, 3, H, W)}; an image object repeated in `images` is processed once."""
        out: dict[str, ModelInputs] = {}
        for pp, models in self.image_groups.values():
            once: dict[int, Tensor] = {}
            for im in images:
                if id(im) not in once:
                    once[id(im)] = pp(im)
            pixels = torch.stack([once[id(im)] for im in images])
            out.update({m: {"pixel_values": pixels} for m in models})
        return out

    def views(self, images: Sequence[Any], image_keys: Sequence[str], views: Sequence[int]) -> dict[str, ModelInputs]:
        """As `images`, each image shown as its view (`draw_view` of its key and view index);
        a (image, view) pair repeated in the batch is processed once."""
        assert self.augment is not None
        drawn = {(id(im), v): draw_view(self.augment, k, v, *im.size) for im, k, v in zip(images, image_keys, views)}
        out: dict[str, ModelInputs] = {}
        for pp, models in self.image_groups.values():
            once: dict[tuple[int, int], Tensor] = {}
            for im, v in zip(images, views):
                if (id(im), v) not in once:
                    once[(id(im), v)] = torch.from_numpy(pp.view_array(im, drawn[(id(im), v)]))
            pixels = torch.stack([once[(id(im), v)] for im, v in zip(images, views)])
            out.update({m: {"pixel_values": pixels} for m in models})
        return out

    def texts(self, captions: Sequence[str]) -> dict[str, ModelInputs]:
        """Model -> {"input_ids", "attention_mask"}: (N, L)."""
        out: dict[str, ModelInputs] = {}
        for pp, models in self.text_groups.values():
            enc = pp(list(captions))
            out.update(
                {
                    m: {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                    for m in models
                }
            )
        return out

    def train_batch(self, samples: Sequence[Sample], epochs: Sequence[int] | None = None) -> Batch:
        """Training pairs -> a `Batch` whose row i pairs image i with caption i; with
        augmentation, image i shows the view `pick_view` chooses for sample i in its epoch
        (`epochs[i]`, default 0)."""
        keys = [s[0] for s in samples]
        views = None
        if self.augment is None:
            images = self.images([s[2] for s in samples])
        else:
            views = [pick_view(self.augment, self.data_seed, e, k) for k, e in zip(keys, epochs or [0] * len(keys))]
            images = self.views([s[2] for s in samples], [k.rsplit("/", 1)[0] for k in keys], views)
        texts = self.texts([s[3] for s in samples])
        inputs = {m: {**images.get(m, {}), **texts.get(m, {})} for m in self.models}
        ids = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return Batch(keys=keys, image_ids=ids, inputs=inputs,
                     views=None if views is None else torch.tensor(views, dtype=torch.int64))

    def eval_batch(self, items: Sequence[EvalImage]) -> RetrievalBatch:
        """Images with all their captions -> a `RetrievalBatch`."""
        captions = [c for _, _, caps in items for c in caps]
        return RetrievalBatch(
            image_ids=torch.tensor([i for i, _, _ in items], dtype=torch.int64),
            text_image_ids=torch.tensor(
                [i for i, _, caps in items for _ in caps], dtype=torch.int64
            ),
            image_inputs=self.images([im for _, im, _ in items]),
            text_inputs=self.texts(captions),
        )


def _part(rank: int, world_size: int) -> Part:
    info = get_worker_info()
    return Part(rank, world_size, info.id if info else 0, info.num_workers if info else 1)


def _attach(batch: Any, split: str, skipped: Counter) -> Any:
    batch.skipped = {f"{split}/{k}": v for k, v in skipped.items()}
    skipped.clear()
    return batch


def _summary(split: str, part: Part, total: Counter) -> None:
    if total:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(total.items()))
        log.warning(
            "%s data, rank %d worker %d: skipped %d samples (%s)",
            split,
            part.rank,
            part.worker,
            sum(total.values()),
            reasons,
        )


class TrainStream(IterableDataset):
    """Shuffled training batches of one rank; each loader worker reads a disjoint part.

    With `steps` the stream repeats the data and yields exactly `steps` batches per rank
    (shared among the workers); without, one pass with the last partial batch dropped.

    Resuming mid-epoch (`skip` > 0): the DataLoader took batches from the workers in turn,
    so worker w produced `skip // W + (w < skip % W)` of them; each worker regenerates and
    drops its share without preprocessing it, and worker ids are rotated by `skip % W` so
    that the first batch after resuming comes from the worker whose turn it was. The
    replay is exact while every worker still has batches (always with `steps`).
    """

    def __init__(
        self,
        *,
        dataset: CaptionDataset,
        collator: Collator,
        batch_size: int,
        shuffle_buffer: int,
        captions_per_image: str,
        seed: int,
        steps: int | None,
        rank: int,
        world_size: int,
    ) -> None:
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.steps = steps
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        """Set by `EpochLoader` before the workers start; seeds the shard order and shuffling."""
        self.skip = 0
        """Batches of this epoch the rank already trained on (set by `EpochLoader` on resume)."""

    def _samples(self, part: Part, skipped: Counter) -> Iterator[tuple[int, Sample]]:
        for rerun in itertools.count() if self.steps is not None else range(1):
            seen = 0
            epoch = self.epoch * 1000 + rerun  # a new shard order for every rerun
            for sample in self.dataset.train_samples(
                part=part,
                seed=self.seed,
                epoch=epoch,
                captions_per_image=self.captions_per_image,
                skipped=skipped,
            ):
                seen += 1
                yield epoch, sample
            if seen == 0:
                return

    def __iter__(self) -> Iterator[Batch]:
        part = _part(self.rank, self.world_size)
        turn = self.skip % part.num_workers
        part = dataclasses.replace(part, worker=(part.worker + turn) % part.num_workers)
        drop = self.skip // part.num_workers + (part.worker < turn)
        quota = None  # batches of this worker
        if self.steps is not None:
            quota = self.steps // part.num_workers + (part.worker < self.steps % part.num_workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{part.rank}/{part.worker}")
        skipped, total, done = Counter(), Counter(), 0
        if quota != 0:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                self._samples(part, skipped)
            )
            for chunk in wds.batched(self.batch_size, collation_fn=list, partial=False)(samples):
                if done < drop:  # trained on before the resumption
                    done += 1
                    skipped.clear()
                    continue
                total.update(skipped)
                batch = self.collator.train_batch([s for _, s in chunk], [e for e, _ in chunk])
                yield _attach(batch, "train", skipped)
                done += 1
                if quota is not None and done >= quota:
                    break
        _summary("train", part, total + skipped)


class EvalStream(IterableDataset):
    """`RetrievalBatch`es over one rank's part of an evaluation split, every image once."""

    def __init__(
        self,
        *,
        dataset: CaptionDataset,
        collator: Collator,
        split: str,
        batch_size: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.dataset = dataset
        self.collator = collator
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[RetrievalBatch]:
        part, skipped, total = _part(self.rank, self.world_size), Counter(), Counter()
        items = self.dataset.eval_images(self.split, part=part, skipped=skipped)
        for chunk in wds.batched(self.batch_size, collation_fn=list, partial=True)(items):
            total.update(skipped)
            yield _attach(self.collator.eval_batch(chunk), self.split, skipped)
        _summary(self.split, part, total + skipped)


class EpochLoader(DataLoader):
    """A DataLoader that tells its `TrainStream` the epoch before the workers start.

    Stateful for Lightning (`state_dict` is saved in checkpoints): the epoch and the number
    of its batches the trainer consumed (`consumed`, counted by the data module when a
    batch is used, not when prefetched), so a resumed run skips them (`TrainStream.skip`).
    """

    def __init__(
        self,
        dataset: TrainStream,
        *,
        epoch_fn: Callable[[], int],
        num_workers: int,
        persistent_workers: bool,
        seed: int,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self.epoch_fn = epoch_fn
        self.consumed = 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: epoch and batches of it consumed."""
        return {"epoch": int(self.dataset.epoch), "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after `state` on the next iteration (when it is the same epoch)."""
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches; an epoch that yields none is an error, not an endless loop
        of empty epochs (Lightning would start the next one forever)."""
        epoch, resume, self._resume = self.epoch_fn(), self._resume, None
        self.consumed = resume["batches"] if resume and resume["epoch"] == epoch else 0
        self.dataset.epoch, self.dataset.skip = epoch, self.consumed
        yielded = 0
        for batch in super().__iter__():
            yielded += 1
            yield batch
        if yielded == 0 and self.consumed == 0:
            raise ConfigError(empty_epoch_problem(self.dataset, self.num_workers))


def empty_epoch_problem(stream: TrainStream, num_workers: int, limit: int = 100_000) -> str:
    """Why a rank's training epoch yielded no batch: every sample skipped (with the counts by
    reason), or too few samples for `data.batch_size` on this rank or in each loader worker.
    Reads this rank's share of the training split once, in the main process (at most `limit`
    samples: an empty epoch means the share is small or unreadable)."""
    skipped: Counter = Counter()
    samples = stream.dataset.train_samples(part=Part(stream.rank, stream.world_size), seed=stream.seed,
                                           epoch=stream.epoch, captions_per_image=stream.captions_per_image,
                                           skipped=skipped)  # fmt: skip
    usable = sum(1 for _ in itertools.islice(samples, limit))
    rank = f"rank {stream.rank} of {stream.world_size}"
    if usable == 0:
        reasons = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in sorted(skipped.items())) or "the split is empty"
        return f"data: the training split has no usable sample on {rank} ({reasons}); check data.dataset and data.args"
    workers = max(1, num_workers)
    if usable < stream.batch_size:
        return (f"data.batch_size: {stream.batch_size} is more than the {usable} training samples of {rank}; "
                "lower data.batch_size (the last partial batch is dropped)")
    return (f"data.num_workers: each of the {workers} loader workers of {rank} gets about {usable // workers} of its "
            f"{usable} training samples, fewer than data.batch_size={stream.batch_size}; lower data.num_workers or "
            "data.batch_size")


def eval_loader(
    dataset: CaptionDataset, preprocess: Preprocess, split: str, *, batch_size: int, num_workers: int,
    rank: int = 0, world_size: int = 1,
) -> DataLoader | None:
    """`RetrievalBatch`es of one rank's part of `split`; None when the dataset has no such split."""
    dataset.prepare()
    if not dataset.has_split(split):
        return None
    stream = EvalStream(dataset=dataset, collator=Collator(preprocess), split=split, batch_size=batch_size,
                        rank=rank, world_size=world_size)
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
