"""Image-text retrieval recall (R@K) for multi-caption sets such as COCO and Flickr30k.

Scores are dot products of L2-normalised embeddings (cosine similarity), computed in
float32 whatever the input dtype.

* image -> text: an image is a hit at K when ANY of its captions ranks in the top K.
* text -> image: a caption is a hit at K when its own image ranks in the top K.

Rank of a query = number of NEGATIVES that score strictly higher than its best positive;
hit@K iff rank < K. Ties therefore count in the query's favour (a negative that scores
exactly as high as the positive does not push it down), which makes the result
deterministic, unlike a sort that breaks ties by position.

R@K only needs to know whether rank < K, so ranks are computed exactly up to max(ks)
and capped there: rank = number of the query's top-max(ks) scores strictly above its best
positive (a positive never exceeds the best positive, so only negatives are counted).
Memory stays at one (chunk_size, T) score block: the similarity matrix is computed once,
one chunk of images at a time, with no full sort. Image -> text takes the top-max(ks) of
each block row. For text -> image, the block's columns update a running top-max(ks) of
image scores per caption, and each caption's positive score is read from the block that
holds its image, so positive and negatives come from the same computed values.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from tqdm.auto import tqdm

from distill.batch import RetrievalBatch
from distill.models.base import Encoder

DEFAULT_KS = (1, 5, 10)


def retrieval_metrics(
    image_emb: Tensor,
    image_ids: Tensor,
    text_emb: Tensor,
    text_image_ids: Tensor,
    chunk_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K in both directions, in percent, for a set of images and their captions.

    Args:
        image_emb: (N, D) L2-normalised image embeddings, any float dtype.
        image_ids: (N,) integer ids, unique.
        text_emb: (T, D) L2-normalised caption embeddings.
        text_image_ids: (T,) the image id of each caption; each must be in `image_ids`.
        chunk_size: Images per score block; peak extra memory is about chunk_size * T floats.
        ks: The K values of R@K.

    Returns:
        `i2t_r{K}` and `t2i_r{K}` for each K (0-100) and `rsum`, their sum.

    Raises:
        ValueError: On bad shapes or dtypes, duplicate image ids, captions whose image is
            missing, images without captions, or non-finite embeddings.
    """
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    img, txt = _check_embeddings(image_emb, image_ids, text_emb, text_image_ids)
    caption_image = _caption_image_index(image_ids, text_image_ids)
    i2t_rank, t2i_rank = _ranks(img, txt, caption_image, chunk_size, max(ks))
    return recalls_from_ranks({"i2t": i2t_rank, "t2i": t2i_rank}, ks)


def retrieval_ranks(
    image_emb: Tensor, image_ids: Tensor, text_emb: Tensor, text_image_ids: Tensor, chunk_size: int = 1024
) -> dict[str, Tensor]:
    """The exact rank of each query's first positive, in both directions (0 = top).

    `i2t[i]` counts the captions of other images that score strictly higher than image i's
    best caption; `t2i[j]` the other images that score strictly higher than caption j's
    image (ties in the query's favour, as in `retrieval_metrics`). Recalls follow exactly:
    R@K = 100 * mean(rank < K) (`recalls_from_ranks`), so comparisons between runs need
    no re-encoding.

    Returns:
        {"i2t": (N,) int32 in image_ids order, "t2i": (T,) int32 in text order}.
    """
    img, txt = _check_embeddings(image_emb, image_ids, text_emb, text_image_ids)
    caption_image = _caption_image_index(image_ids, text_image_ids)
    i2t, t2i = _ranks(img, txt, caption_image, chunk_size, None)
    return {"i2t": i2t.to(torch.int32).cpu(), "t2i": t2i.to(torch.int32).cpu()}


def recalls_from_ranks(ranks: dict[str, Any], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """`i2t_r{K}`, `t2i_r{K}` (percent) and `rsum` from per-query ranks."""
    out: dict[str, float] = {}
    for name in ("i2t", "t2i"):
        rank = torch.as_tensor(ranks[name])
        for k in _check_ks(ks):
            out[f"{name}_r{k}"] = 100.0 * int((rank < k).sum()) / rank.numel()
    out["rsum"] = sum(out.values())
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def _check_embeddings(
    image_emb: Tensor, image_ids: Tensor, text_emb: Tensor, text_image_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """Validate shapes and dtypes; return both embeddings as float32."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected image_emb (N, D) and text_emb (T, D), got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    for name, emb, ids in (("image", image_emb, image_ids), ("text", text_emb, text_image_ids)):
        if ids.ndim != 1 or ids.shape[0] != emb.shape[0]:
            raise ValueError(
                f"{name} ids must be 1-D with one id per {name} row: ids {tuple(ids.shape)}, "
                f"embeddings {tuple(emb.shape)}"
            )
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{name} ids must be integers, got {ids.dtype}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    img, txt = image_emb.float(), text_emb.float()
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    return img, txt


def _caption_image_index(image_ids: Tensor, text_image_ids: Tensor) -> Tensor:
    """(T,) row in `image_ids` of each caption's image; raises on duplicates and orphans."""
    sorted_ids, perm = torch.sort(image_ids)
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]].unique()
    if dup.numel():
        raise ValueError(
            f"image_ids must be unique; {dup.numel()} id(s) repeat, e.g. {dup[:5].tolist()} "
            "(de-duplicate first, as RetrievalRecall.compute does)"
        )
    text_image_ids = text_image_ids.to(sorted_ids.device, sorted_ids.dtype)
    pos = torch.searchsorted(sorted_ids, text_image_ids).clamp_max(len(sorted_ids) - 1)
    found = sorted_ids[pos] == text_image_ids
    if not found.all():
        missing = text_image_ids[~found].unique()
        raise ValueError(
            f"{int((~found).sum())} caption(s) belong to {missing.numel()} image id(s) that "
            f"are not in image_ids, e.g. {missing[:5].tolist()}; every caption's image must "
            "be part of the evaluated images"
        )
    return perm[pos]


def _ranks(
    img: Tensor, txt: Tensor, caption_image: Tensor, chunk_size: int, max_k: int | None
) -> tuple[Tensor, Tensor]:
    """(N,) image->text and (T,) text->image ranks, exact below max_k, capped at max_k
    (max_k None: exact, with a second pass over the blocks for text->image)."""
    n, t = img.shape[0], txt.shape[0]
    counts = torch.bincount(caption_image, minlength=n)
    if (counts == 0).any():
        raise ValueError(
            f"{int((counts == 0).sum())} image(s) have no caption; image->text recall is "
            "undefined for them (drop them or add their captions)"
        )
    # Captions grouped by image: image i owns order[ptr[i]:ptr[i + 1]].
    order = torch.argsort(caption_image, stable=True)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=img.device)
    ptr[1:] = torch.cumsum(counts, 0)
    # (N, M) caption indices per image, padded by repeating the first one (max is unchanged).
    slot = torch.arange(t, device=img.device) - ptr[caption_image[order]]
    positives = order[ptr[:-1]].unsqueeze(1).repeat(1, int(counts.max()))
    positives[caption_image[order], slot] = order

    exact = max_k is None
    i2t_k, t2i_k = (t, n) if exact else (min(max_k, t), min(max_k, n))
    t2i_top = torch.full((t2i_k, t), float("-inf"), device=img.device)
    t2i_pos = torch.empty(t, device=img.device)
    i2t_rank = torch.empty(n, dtype=torch.long, device=img.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        block = img[start:end] @ txt.T  # (c, T)
        best = block.gather(1, positives[start:end]).amax(1, keepdim=True)
        # topk + compare is several times faster than (block > best).sum(1) on CPU, when capped.
        i2t_rank[start:end] = (block > best).sum(1) if exact else (block.topk(i2t_k, dim=1).values > best).sum(1)
        mine = order[ptr[start] : ptr[end]]
        t2i_pos[mine] = block[caption_image[mine] - start, mine]
        if not exact:
            block_top = block.topk(min(t2i_k, end - start), dim=0).values
            t2i_top = torch.cat([t2i_top, block_top]).topk(t2i_k, dim=0).values
    if not exact:
        return i2t_rank, (t2i_top > t2i_pos).sum(0)
    t2i_rank = torch.zeros(t, dtype=torch.long, device=img.device)
    for start in range(0, n, chunk_size):  # the same blocks again, now that every positive is known
        block = img[start : min(start + chunk_size, n)] @ txt.T
        t2i_rank += (block > t2i_pos[None, :]).sum(0)
    return i2t_rank, t2i_rank


class RetrievalRecall(Metric):
    """R@K in both directions, correct under DDP (where DistributedSampler pads with repeats).

    `update` only stores embeddings and ids; `compute` gathers every rank's states,
    drops repeated images (by id) and repeated captions (by `text_ids`, or by image id and
    position when no `text_ids` are given), then calls `retrieval_metrics`.

    Args:
        chunk_size: Passed to `retrieval_metrics`.
        ks: The K values of R@K.
        compute_on_cpu: Move the stored states to CPU after each update (torchmetrics option).
        process_group: The process group to gather over (default: the world).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        chunk_size: int = 1024,
        ks: Sequence[int] = DEFAULT_KS,
        compute_on_cpu: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(compute_on_cpu=compute_on_cpu, process_group=process_group)
        self.chunk_size = chunk_size
        self.ks = _check_ks(ks)
        for name in ("image_emb", "image_ids", "text_emb", "text_keys"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_emb: Tensor,
        image_ids: Tensor,
        text_emb: Tensor,
        text_image_ids: Tensor,
        text_ids: Tensor | None = None,
    ) -> None:
        """Store one batch of images and captions.

        Args:
            image_emb: (B, D) image embeddings.
            image_ids: (B,) global image ids.
            text_emb: (T, D) caption embeddings.
            text_image_ids: (T,) the image id of each caption.
            text_ids: (T,) optional global caption ids. Without them a caption is known by
                (image id, its position among that image's captions in this batch), which
                requires each batch to hold every caption of its images, and each image
                at most once (true of `RetrievalBatch`).

        Raises:
            ValueError: If shapes disagree, or an image repeats in one batch without `text_ids`.
        """
        if text_ids is None:
            if image_ids.unique().numel() != image_ids.numel():
                raise ValueError(
                    "an image id repeats within one update; pass text_ids so that its "
                    "captions can be de-duplicated"
                )
            second, mode = _ordinal_within_group(text_image_ids), 0
        else:
            if text_ids.shape != text_image_ids.shape:
                raise ValueError(
                    f"text_ids {tuple(text_ids.shape)} and text_image_ids "
                    f"{tuple(text_image_ids.shape)} must have the same shape"
                )
            second, mode = text_ids.long(), 1
        _check_embeddings(image_emb, image_ids, text_emb, text_image_ids)
        keys = torch.stack([text_image_ids.long(), second, torch.full_like(second, mode)], 1)
        self.image_emb.append(image_emb.detach())
        self.image_ids.append(image_ids.detach().long())
        self.text_emb.append(text_emb.detach())
        self.text_keys.append(keys.detach())

    def compute(self) -> dict[str, float]:
        """De-duplicate the gathered images and captions and compute `retrieval_metrics`.

        Raises:
            ValueError: If nothing was stored, `text_ids` were given for some updates but
                not others, or the images and captions do not match up.
        """
        if isinstance(self.image_ids, list) and not self.image_ids:
            raise ValueError("RetrievalRecall.compute() called before any update()")
        image_ids = dim_zero_cat(self.image_ids)
        text_keys = dim_zero_cat(self.text_keys)
        if text_keys[:, 2].unique().numel() > 1:
            raise ValueError("pass text_ids to every update() call or to none of them")
        keep_img = _first_occurrence(image_ids)
        keep_txt = _first_occurrence(text_keys[:, :2])
        return retrieval_metrics(
            dim_zero_cat(self.image_emb)[keep_img],
            image_ids[keep_img],
            dim_zero_cat(self.text_emb)[keep_txt],
            text_keys[keep_txt, 0],
            chunk_size=self.chunk_size,
            ks=self.ks,
        )


def _ordinal_within_group(ids: Tensor) -> Tensor:
    """Position of each element among the earlier elements with the same id ([7, 3, 7] -> [0, 0, 1])."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    idx = torch.arange(ids.numel(), device=ids.device)
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(0).values
    ordinal = torch.empty_like(idx)
    ordinal[order] = idx - run_start
    return ordinal


def _first_occurrence(keys: Tensor) -> Tensor:
    """Sorted indices of the first row of each distinct key (1-D ids or (n, k) rows)."""
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    idx = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((int(inverse.max()) + 1,), keys.shape[0], device=keys.device)
    first = first.scatter_reduce(0, inverse, idx, reduce="amin")
    return first.sort().values


@torch.no_grad()
def encode_loader(
    encoder: Encoder,
    loader: Iterable[RetrievalBatch],
    model_name: str,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Embed every image and caption of a retrieval loader with one model.

    The encoder is put in eval mode for the pass and restored afterwards. A progress bar
    is shown when stderr is a terminal.

    Args:
        encoder: The model; must already be on `device`.
        loader: Yields `RetrievalBatch`es holding this model's inputs under `model_name`.
        model_name: The model's name in the batches' input dicts.
        device: Where to run; the results stay there.

    Returns:
        (image_emb (N, D), image_ids (N,), text_emb (T, D), text_image_ids (T,)).

    Raises:
        KeyError: If a batch holds no inputs for `model_name`.
        ValueError: If the loader yields no batches.
    """
    images: list[Tensor] = []
    image_ids: list[Tensor] = []
    texts: list[Tensor] = []
    text_image_ids: list[Tensor] = []
    was_training = encoder.training
    encoder.eval()
    try:
        bar = tqdm(
            loader, desc=f"encode {model_name}", unit="batch", disable=not sys.stderr.isatty()
        )
        for batch in bar:
            if model_name not in batch.image_inputs or model_name not in batch.text_inputs:
                raise KeyError(
                    f"batch has no inputs for model {model_name!r}; it has image inputs for "
                    f"{sorted(batch.image_inputs)} and text inputs for {sorted(batch.text_inputs)}"
                )
            text = batch.text_inputs[model_name]
            pixels = batch.image_inputs[model_name]["pixel_values"].to(device)
            images.append(encoder.encode_image(pixels))
            texts.append(
                encoder.encode_text(text["input_ids"].to(device), text["attention_mask"].to(device))
            )
            image_ids.append(batch.image_ids.to(device))
            text_image_ids.append(batch.text_image_ids.to(device))
    finally:
        encoder.train(was_training)
    if not images:
        raise ValueError("the retrieval loader yielded no batches")
    return torch.cat(images), torch.cat(image_ids), torch.cat(texts), torch.cat(text_image_ids)
