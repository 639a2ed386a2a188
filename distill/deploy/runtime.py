"""Run an exported model folder (`distill export`) without the training code.

The folder holds `manifest.json`, the two encoders (`image.onnx` + `text.onnx`, or
`image.pt` + `text.pt` for TorchScript) and `tokenizer/`. `ExportedModel` turns PIL images
and caption strings into L2-normalised float32 embeddings, with the same preprocessing
as training (`distill.pixels.PixelSpec`, PIL and numpy, so that ONNX inference needs no torch,
and `TextPreprocess`'s tokenizer call).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distill.errors import ConfigError
from distill.pixels import PixelSpec

MANIFEST = "manifest.json"


def default_threads() -> int:
    """Intra-op threads of a session: the usable cores, at most 4 (more rarely helps small models)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, or a one-line `ConfigError` naming the folder."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.parent.is_dir():
        raise ConfigError(f"export folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not an export folder (no {MANIFEST}; write one with `distill export`)")
    return json.loads(path.read_text())


def preprocess_images(images: Sequence[Any], spec: PixelSpec) -> np.ndarray:
    """PIL images (or image paths) -> (N, 3, H, W) float32, exactly as training preprocessed
    them (`PixelSpec.to_array`: the same PIL calls and float32 arithmetic)."""
    out = np.empty((len(images), 3, *spec.out_size), dtype=np.float32)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        out[i] = spec.to_array(image)
    return out


class _OnnxTower:
    """One onnxruntime session on the CPU; called with named numpy inputs."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort  # onnxruntime: heavy, only for ONNX exports

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no warnings about unused initializers
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, inputs)[0]


class _TorchScriptTower:
    """One `torch.jit.load`ed module; same calling convention as `_OnnxTower`."""

    def __init__(self, path: Path, names: tuple[str, ...]) -> None:
        import torch  # torch: optional here, only for TorchScript exports

        self.torch = torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript for torch.export
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.inference_mode():
            args = [self.torch.from_numpy(inputs[n]) for n in self.names]
            return self.module(*args).float().numpy()


class ExportedModel:
    """An export folder loaded for inference: images and captions in, embeddings out.

    Args:
        folder: A folder written by `distill export`.
        threads: Intra-op threads of the ONNX sessions (default `default_threads()`).
            TorchScript runs with torch's own thread setting, left untouched.

    Example:
        >>> model = ExportedModel("runs/demo/export")  # doctest: +SKIP
        >>> model.encode_texts(["a red circle"]).shape  # doctest: +SKIP
        (1, 128)
    """

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        from transformers import AutoTokenizer  # transformers: heavy, imported when a model loads

        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self.embed_dim = int(self.manifest["embed_dim"])
        image, text = self.manifest["image"], self.manifest["text"]
        missing = [f for f in (image["file"], text["file"], self.manifest["tokenizer"]) if not (self.folder / f).exists()]
        if missing:
            raise ConfigError(f"export folder {str(folder)!r} lacks {', '.join(missing)}")
        self.pixels = PixelSpec.from_dict(image)
        self.size = self.pixels.out_size[0]
        self.max_length = int(text["max_length"])
        self.padding = text.get("padding", "longest")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / self.manifest["tokenizer"]))
        fmt = self.manifest["format"]
        if fmt == "onnx":
            n = threads or default_threads()
            self.image_tower: Any = _OnnxTower(self.folder / image["file"], n)
            self.text_tower: Any = _OnnxTower(self.folder / text["file"], n)
        elif fmt == "torchscript":
            self.image_tower = _TorchScriptTower(self.folder / image["file"], ("pixel_values",))
            self.text_tower = _TorchScriptTower(self.folder / text["file"], ("input_ids", "attention_mask"))
        else:
            raise ConfigError(f"{self.folder / MANIFEST}: unknown format {fmt!r} (onnx or torchscript)")

    def preprocess_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, 3, size, size) float32 pixel values, as the image encoder reads them."""
        return preprocess_images(images, self.pixels)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """`input_ids` and `attention_mask`, (N, L) int64, padded to the longest caption."""
        enc = self.tokenizer(
            list(texts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {k: enc[k].astype(np.int64, copy=False) for k in ("input_ids", "attention_mask")}

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """(N, 3, size, size) preprocessed pixels -> (N, D) float32 L2-normalised."""
        return np.ascontiguousarray(self.image_tower({"pixel_values": pixel_values}), dtype=np.float32)

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(N, L) token ids and mask -> (N, D) float32 L2-normalised."""
        out = self.text_tower({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """PIL images (or paths) -> (N, D) float32 L2-normalised embeddings."""
        parts = [
            self.encode_pixels(self.preprocess_images(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Captions or queries -> (N, D) float32 L2-normalised embeddings.

        Each batch is padded to its longest caption, not to `max_length`: a single short
        query costs only its own tokens.
        """
        parts = [
            self.encode_tokens(**self.tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)
