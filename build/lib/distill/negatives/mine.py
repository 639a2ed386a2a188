"""Mining hard negatives: embed the training corpus with one model, keep each sample's
hardest captions and images of other images (the `distill.negatives.store` file format).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from distill.data.base import Part, check_dataset
from distill.data.loading import Collator
from distill.errors import ConfigError
from distill.models.base import Encoder
from distill.negatives.store import VERSION


@torch.no_grad()
def embed_corpus(
    encoder: Encoder, data_cfg: Any, *, device: str | torch.device = "cpu", batch_size: int | None = None
) -> dict[str, Any]:
    """Embed every training image once and every caption with one model (eval mode).

    Returns:
        `keys`, `image_ids`, `image` (per sample) and `text`, as in the module docstring.
    """
    dataset = check_dataset(data_cfg)
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


def mine_negatives(
    encoder: Encoder, model: str, data_cfg: Any, *, k: int, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Embed the training corpus with `encoder` and mine k negatives per sample both ways."""
    return mine_index(embed_corpus(encoder, data_cfg, device=device), k, model)
