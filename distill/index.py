"""Hard-negative index: the training corpus embedded by one model, with mined negatives.

`distill index mine CONFIG --model NAME --output FILE` (or a stage's `build_index`) writes one
`torch.save` file holding plain containers and tensors (loadable with `weights_only=True`):

    version    1
    model      name of the model that embedded the corpus
    k          negatives mined per sample and direction
    keys       N sample keys `<image key>/<caption index>` (every caption of every training
               image, in the dataset's stored order), as `train_samples` yields them
    image_ids  (N,) int64 image id of each sample
    image      (N, D) float32 embedding of each sample's image (repeated across its captions)
    text       (N, D) float32 embedding of each sample's caption
    i2t        (N, k) int64: the samples whose captions score highest against sample i's
               image, best first, never one of the same image id
    t2i        (N, k) int64: the hardest images for sample i's caption, best first, one
               sample per image (its first caption's row), never one of the same image id

Refresh (an index built from a model that trains): `distill.stages` rebuilds it before a
stage that names `build_index`, from that stage's starting weights; and `IndexRefresh`, a
callback `fit` adds for `hard_negative` edges with `refresh_every`, re-embeds and re-mines
every `refresh_every` steps with the current weights (each DDP rank computes the same index;
rank 0 rewrites the file, so a resumed run continues with the latest one).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from distill.config import Config
from distill.errors import ConfigError
from distill.models.base import Encoder

log = logging.getLogger(__name__)
VERSION = 1
FIELDS = ("version", "model", "k", "keys", "image_ids", "image", "text", "i2t", "t2i")


@torch.no_grad()
def embed_corpus(
    encoder: Encoder, data_cfg: Any, *, device: str | torch.device = "cpu", batch_size: int | None = None
) -> dict[str, Any]:
    """Embed every training image once and every caption with one model (eval mode).

    Returns:
        `keys`, `image_ids`, `image` (per sample) and `text`, as in the module docstring.
    """
    from distill.data.base import Part
    from distill.data.datamodule import build_dataset
    from distill.data.loading import Collator

    dataset = build_dataset(data_cfg.dataset, data_cfg.args)
    problems = dataset.check()
    if problems:
        raise ConfigError(problems)
    dataset.prepare()
    collator = Collator({"m": (encoder.image_preprocess(), encoder.text_preprocess())})
    keys: list[str] = []
    ids, images, texts, image_of = [], [], [], []
    n_images = 0
    was_training = encoder.training
    encoder.eval()
    try:
        items = iter(dataset.images("train", part=Part(), seed=None, epoch=0, skipped=Counter()))
        while chunk := list(itertools.islice(items, batch_size or data_cfg.eval_batch_size)):
            batch = collator.eval_batch([(i, im, caps) for _, i, im, caps in chunk])
            pixels = batch.image_inputs["m"]["pixel_values"].to(device)
            dtype = next(encoder.parameters()).dtype
            images.append(encoder.encode_image(pixels.to(dtype)).float().cpu())
            text = {k: v.to(device) for k, v in batch.text_inputs["m"].items()}
            texts.append(encoder.encode_text(text["input_ids"], text["attention_mask"]).float().cpu())
            for j, (key, image_id, _, captions) in enumerate(chunk):
                keys += [f"{key}/{c}" for c in range(len(captions))]
                ids += [image_id] * len(captions)
                image_of += [n_images + j] * len(captions)  # the sample's row in `images`
            n_images += len(chunk)
    finally:
        encoder.train(was_training)
    if not keys:
        raise ConfigError(f"data.dataset: {data_cfg.dataset!r} has no training samples to index")
    return {
        "keys": keys,
        "image_ids": torch.tensor(ids, dtype=torch.int64),
        "image": torch.cat(images)[torch.tensor(image_of)],
        "text": torch.cat(texts),
    }


def mine(
    query: Tensor, query_ids: Tensor, candidates: Tensor, candidate_ids: Tensor, k: int, chunk_size: int | None = None
) -> Tensor:
    """(Q, k) indices of each query's k highest-scoring candidates of another image id, best first.

    Scores are computed `chunk_size` queries at a time (default: about 16M scores per chunk).

    Raises:
        ValueError: If some query has fewer than k candidates of other images.
    """
    out = []
    chunk_size = chunk_size or max(1, 2**24 // max(1, len(candidates)))
    for start in range(0, len(query), chunk_size):
        scores = query[start : start + chunk_size].float() @ candidates.float().t()
        same = query_ids[start : start + chunk_size, None] == candidate_ids[None, :]
        available = len(candidates) - int(same.sum(1).max())
        if k > available:
            raise ValueError(f"cannot mine {k} negatives: a sample has only {available} candidates of other images")
        out.append(scores.masked_fill(same, float("-inf")).topk(k, dim=1).indices)
    return torch.cat(out)


def mine_index(corpus: dict[str, Any], k: int, model: str) -> dict[str, Any]:
    """Add the `i2t` and `t2i` tables to an embedded corpus (k is capped at what exists)."""
    ids = corpus["image_ids"]
    row_of: dict[int, int] = {}  # image id -> its row among the images (its first sample)
    for i, image_id in enumerate(ids.tolist()):
        row_of.setdefault(image_id, i)
    reps = torch.tensor(sorted(row_of.values()))
    image_row = torch.searchsorted(reps, torch.tensor([row_of[i] for i in ids.tolist()]))
    k = min(k, len(reps) - 1)
    if k < 1:
        raise ConfigError("data: the training split needs at least two images to mine negatives")
    per_image = mine(corpus["image"][reps], ids[reps], corpus["text"], ids, k)  # (M, k) samples
    t2i = reps[mine(corpus["text"], ids, corpus["image"][reps], ids[reps], k)]
    return {"version": VERSION, "model": model, "k": k, **corpus, "i2t": per_image[image_row], "t2i": t2i}


def build_index(
    encoder: Encoder, model: str, data_cfg: Any, *, k: int, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Embed the training corpus with `encoder` and mine k negatives per sample both ways."""
    return mine_index(embed_corpus(encoder, data_cfg, device=device), k, model)


def save_index(index: dict[str, Any], path: str | Path) -> Path:
    """Write an index atomically (a killed run never leaves a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({k: index[k] for k in FIELDS}, tmp)
    os.replace(tmp, path)
    return path


def load_index(path: str | Path) -> dict[str, Any]:
    """Read an index written by `save_index`.

    Raises:
        ConfigError: If the file is missing or is not a distill index.
    """
    if not Path(path).is_file():
        raise ConfigError(f"index {str(path)!r}: no such file; build it with `distill index mine` or a stage's build_index")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and data.get("kind") == "distill-search-index":
        raise ConfigError(f"index {str(path)!r}: a search index (`distill index build`), not a hard-negative index")
    missing = [f for f in FIELDS if f not in data] if isinstance(data, dict) else list(FIELDS)
    if missing:
        raise ConfigError(f"index {str(path)!r}: not a distill index (missing {', '.join(missing)})")
    return data


def hard_negative_edges(graph: Any) -> dict[str, Any]:
    """Enabled `hard_negative` edges of a graph: edge name -> loss."""
    from distill.losses.hard_negative import HardNegative

    return {e.name: e.loss for e in graph.enabled_edges() if isinstance(e.loss, HardNegative)}


def attach(config: Config, graph: Any) -> list[pl.Callback]:
    """Load the index of every enabled `hard_negative` edge before training; refresh callbacks.

    Raises:
        ConfigError: One line per edge whose index is missing, too shallow or not refreshable.
    """
    problems, callbacks = [], []
    for name, loss in hard_negative_edges(graph).items():
        path = f"edges.{name}.args"
        try:
            index = load_index(loss.index_path)
            loss.set_index(index)
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
        callbacks.append(IndexRefresh(edge=name, model=model, data_cfg=config.data, every=loss.refresh_every, k=int(index["k"])))
    if problems:
        raise ConfigError(problems)
    return callbacks


class IndexRefresh(pl.Callback):
    """Every `every` steps, rebuild an edge's index with the current weights of `model`.

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
        index = build_index(graph.models[self.model], self.model, self.data_cfg, k=self.k, device=pl_module.device)
        loss.set_index(index)
        if trainer.is_global_zero:
            save_index(index, loss.index_path)
        self.refreshed.append(step)
        log.info("refreshed the index of edge %s at step %d", self.edge, step)


def index_target(
    target: str, overrides: list[str] | None, *, model: str, output: str, k: int, device: str = "cpu"
) -> dict[str, Any]:
    """`distill index mine`: embed the training corpus with a model of a config (as built) or of a
    `distill fit` checkpoint (as trained), mine `k` negatives per sample and save to `output`."""
    from distill.build import build_graph
    from distill.config import load_config
    from distill.evaluate import load_checkpoint

    if target.endswith(".ckpt"):
        module = load_checkpoint(target, overrides)
        config, graph = module.config, module.graph
    else:
        config = load_config(target, overrides)
        config.eval.model = model  # make sure it loads
        graph = build_graph(config)
    if model not in graph.models:
        raise ConfigError(f"--model: {model!r} is not a loaded model; loaded: {', '.join(graph.models)}")
    index = build_index(graph.models[model].to(device), model, config.data, k=k, device=device)
    save_index(index, output)
    return index
