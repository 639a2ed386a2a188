"""Does an export compute what the PyTorch model computes? Parity and the int8 recall cost.

Parity runs real inputs (images and captions of the checkpoint's dataset, or the caller's)
through the export folder's runtime (its own preprocessing and tokenizer included) and
through the PyTorch encoder, and compares the embeddings one by one by cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from distill.data.base import EvalImage, open_dataset
from distill.deploy.runtime import ExportedModel
from distill.errors import ConfigError
from distill.eval.retrieval import retrieval_metrics
from distill.models.base import Encoder

MIN_COSINE = 0.9999
"""Worst per-embedding cosine accepted between an fp32 export and PyTorch."""
INT8_MIN_COSINE = 0.99
"""The looser bound for a text encoder quantised to int8 (its recall cost is measured too)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ParityError(RuntimeError):
    """An export whose embeddings differ from PyTorch's; the message is one line."""


class Exported(Protocol):
    """An export loaded by its runtime: `ExportedModel`, or an open_clip / transformers
    folder loaded by its own library (`manifest[modality]["file"]` names the file an error
    blames)."""

    folder: Path
    manifest: dict[str, Any]

    def encode_images(self, images: Sequence[Image.Image], /) -> np.ndarray: ...

    def encode_texts(self, captions: Sequence[str], /) -> np.ndarray: ...


def eval_items(config: Any, split: str | None = None, limit: int | None = None) -> tuple[str, list[EvalImage]]:
    """The first `limit` (image id, image, captions) of a split of a config's dataset.

    Args:
        config: A `Config` (its `data` section names the dataset).
        split: "test", "val" or "train"; default the test split, else `eval.split`.
        limit: Stop after this many images (all when None).

    Returns:
        The split read and its items.
    """
    dataset = open_dataset(config.data.dataset, config.data.args)
    problems = dataset.check()
    if problems:
        raise ConfigError([*problems, "export: the parity inputs come from this dataset; pass --images and --captions"])
    split = split or ("test" if dataset.has_split("test") else config.eval.split)
    items: list[EvalImage] = []
    for item in dataset.eval_images(split):
        if limit is not None and len(items) >= limit:
            break
        items.append(item)
    if not items:
        raise ConfigError(f"data.dataset: {config.data.dataset!r} has no images in its {split!r} split")
    return split, items


def parity_inputs(
    config: Any, *, images: str | Path | None = None, captions: str | Path | None = None, n: int = 32
) -> tuple[list[Image.Image], list[str]]:
    """Real images and captions for the parity check.

    Args:
        config: The checkpoint's config; its dataset's test split serves whatever of
            `images` / `captions` is not given.
        images: A folder of image files (the first `n` by name are read).
        captions: A text file, one caption per line (the first `5 n` are read).
        n: Images to compare.
    """
    pics: list[Image.Image] = []
    texts: list[str] = []
    if images is not None:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--images: folder {str(images)!r} does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise ConfigError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(images)!r}")
        for path in files:
            with Image.open(path) as im:
                pics.append(im.convert("RGB"))
    if captions is not None:
        path = Path(captions).expanduser()
        if not path.is_file():
            raise ConfigError(f"--captions: file {str(captions)!r} does not exist")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()][: 5 * n]
        if not texts:
            raise ConfigError(f"--captions: {str(captions)!r} has no captions")
    if images is None or captions is None:
        _, items = eval_items(config, limit=n)
        pics = pics or [image for _, image, _ in items]
        texts = texts or [c for _, _, caps in items for c in caps]
    return pics, texts


def _torch_embeddings(encoder: Encoder, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch encoder's embeddings with its own preprocessing, as in training."""
    image_pre, text_pre = encoder.image_preprocess(), encoder.text_preprocess()
    assert image_pre is not None and text_pre is not None
    encoder.eval()
    with torch.inference_mode():
        image = encoder.encode_image(torch.stack([image_pre(im) for im in images]))
        text = encoder.encode_text(**text_pre(list(captions)))
    return image.float().numpy(), text.float().numpy()


def _worst(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two (N, D) arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) + 1e-12)
    return float(cos.min())


def check_parity(
    exported: Exported,
    encoder: Encoder,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    modalities: Sequence[str] = ("image", "text"),
    min_cosine: float | dict[str, float] = MIN_COSINE,
    name: str | Path = "",
) -> dict[str, float]:
    """Compare the export with PyTorch embedding by embedding; raise `ParityError` below the bound.

    The export runs the first input alone and the rest as one batch, so a batch-1 graph
    and a padded multi-caption batch are both checked.

    Args:
        exported: The export folder, loaded.
        encoder: The PyTorch model it was exported from.
        images: Real images (PIL).
        captions: Real captions.
        modalities: Which encoders to compare.
        min_cosine: The bound, or one per modality.
        name: The folder named in the error message (default the export's folder).

    Returns:
        Modality -> the worst cosine measured.
    """
    ref_image, ref_text = _torch_embeddings(encoder, images, captions)
    ours = {
        "image": lambda: np.concatenate([exported.encode_images(images[:1]), exported.encode_images(images[1:])]),
        "text": lambda: np.concatenate([exported.encode_texts(captions[:1]), exported.encode_texts(captions[1:])]),
    }
    refs = {"image": ref_image, "text": ref_text}
    out: dict[str, float] = {}
    for modality in modalities:
        bound = min_cosine[modality] if isinstance(min_cosine, dict) else min_cosine
        got = ours[modality]()
        worst = _worst(got, refs[modality]) if got.shape == refs[modality].shape else float("nan")
        if not worst >= bound:  # also catches NaN and shape mismatches
            file = Path(name or exported.folder) / exported.manifest[modality]["file"]
            raise ParityError(
                f"{file}: {modality} parity failed: worst cosine {worst:.6f} < {bound} over "
                f"{len(refs[modality])} {modality} embeddings vs PyTorch (output {got.shape}, expected {refs[modality].shape})"
            )
        out[modality] = worst
    return out


def text_recall_cost(fp32: ExportedModel, int8: ExportedModel, items: Sequence[EvalImage]) -> dict[str, Any]:
    """R@1/5/10 both ways and RSUM with the fp32 and with the int8 text encoder (fp32 images).

    Args:
        fp32: The export with its fp32 text encoder.
        int8: The same export with the quantised text encoder.
        items: (image id, image, captions) of an evaluation split.

    Returns:
        `{"images", "captions", "fp32": metrics, "int8": metrics, "rsum_drop"}`.
    """
    image = torch.from_numpy(fp32.encode_images([im for _, im, _ in items]))
    image_ids = torch.tensor([i for i, _, _ in items])
    captions = [c for _, _, caps in items for c in caps]
    text_ids = torch.tensor([i for i, _, caps in items for _ in caps])
    metrics = {
        key: retrieval_metrics(image, image_ids, torch.from_numpy(model.encode_texts(captions)), text_ids)
        for key, model in (("fp32", fp32), ("int8", int8))
    }
    return {
        "images": len(items),
        "captions": len(captions),
        **metrics,
        "rsum_drop": metrics["fp32"]["rsum"] - metrics["int8"]["rsum"],
    }
