"""What the index, search and serve commands need from a model: the `Embedder` protocol.

Two embedders, picked from the path given to `--model`:

- a folder holding `manifest.json`, written by `distill export`: `ExportedModel`
  (`distill.deploy.runtime`), the deployed form;
- a `.ckpt` written by `distill fit`, optionally `path.ckpt:model` to pick a model of its
  graph (default: the config's `eval.model`): `CheckpointEmbedder`, the trained weights
  through PyTorch.

Both return float32 L2-normalised rows, so that a dot product is the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from distill.deploy.runtime import ExportedModel
from distill.errors import ConfigError
from distill.training.checkpoint import load_checkpoint


@runtime_checkable
class Embedder(Protocol):
    """Images and texts -> (N, embed_dim) float32 L2-normalised numpy rows."""

    embed_dim: int

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (N, embed_dim) float32, unit rows."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (N, embed_dim) float32, unit rows (tokenisation included)."""
        ...

    def describe(self) -> str:
        """One line naming the model, recorded in the index it builds."""
        ...


class CheckpointEmbedder:
    """One model of a `distill fit` checkpoint, in eval mode on `device`.

    Args:
        path: The `.ckpt` file.
        model: Which model of the checkpoint's graph; default the config's `eval.model`.
        device: Where the model runs.
    """

    def __init__(self, path: str | Path, model: str | None = None, *, device: str = "cpu") -> None:
        module = load_checkpoint(path)
        name = model or module.config.eval.model
        if name not in module.graph.models:
            raise ConfigError(
                f"--model: {str(path)!r} has no model {name!r}; loaded: {', '.join(module.graph.models)}"
            )
        self.path, self.name, self.device = Path(path), name, torch.device(device)
        self.encoder = module.graph.models[name].float().eval().to(self.device)
        self.image_preprocess = self.encoder.image_preprocess()
        self.text_preprocess = self.encoder.text_preprocess()
        if self.image_preprocess is None or self.text_preprocess is None:
            raise ConfigError(f"--model: model {name!r} of {str(path)!r} does not encode both images and text")
        self.embed_dim = int(self.encode_texts(["a"]).shape[1])

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.image_preprocess(im) for im in images]).to(self.device)
        return self.encoder.encode_image(pixels).float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.text_preprocess(list(texts))
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        return self.encoder.encode_text(ids, mask).float().cpu().numpy()

    def describe(self) -> str:
        kind = type(self.encoder).__name__
        return f"checkpoint {self.path} model {self.name} ({kind}, dim {self.embed_dim}, torch)"


class ExportEmbedder:
    """An export folder through `distill.deploy.runtime.ExportedModel`, plus `describe()`.

    Args:
        folder: A folder written by `distill export`.
        threads: Intra-op threads of the runtime (None: the runtime's default).
    """

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.model: Any = ExportedModel(folder, threads=threads) if threads else ExportedModel(folder)
        self.embed_dim = int(self.model.embed_dim)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.asarray(self.model.encode_images(list(images)), dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode_texts(list(texts)), dtype=np.float32)

    def describe(self) -> str:
        manifest = getattr(self.model, "manifest", {}) or {}
        quantized = " int8 text" if (manifest.get("text") or {}).get("quantized") else ""
        return f"export {self.folder} ({manifest.get('format', '?')}{quantized}, model {manifest.get('model', '?')}, dim {self.embed_dim})"


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`path.ckpt:model` -> (path, model); anything else -> (path, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".ckpt") and tail and "/" not in tail:
        return Path(head).expanduser(), tail
    return Path(spec).expanduser(), None


def resolve_spec(spec: str) -> str:
    """The spec with an absolute path, as recorded in an index (valid from any folder)."""
    path, model = split_spec(spec)
    return str(path.resolve()) + (f":{model}" if model else "")


def load_embedder(spec: str, *, device: str = "cpu", what: str = "--model", threads: int | None = None) -> Embedder:
    """The embedder an export folder or a checkpoint path names.

    `threads` sets an export's runtime threads; a checkpoint runs with torch's setting.

    Raises:
        ConfigError: One line naming the path when it is missing or neither kind.
    """
    path, model = split_spec(spec)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ConfigError(f"{what}: {str(path)!r} is a folder without manifest.json (not a `distill export` folder)")
        if model:
            raise ConfigError(f"{what}: {spec!r}: an export folder holds one model; drop ':{model}'")
        return ExportEmbedder(path, threads=threads)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(f"{what}: checkpoint {str(path)!r} does not exist")
        return CheckpointEmbedder(path, model, device=device)
    if not path.exists():
        raise ConfigError(f"{what}: {str(path)!r} does not exist (expected an export folder or a .ckpt)")
    raise ConfigError(f"{what}: {str(path)!r} is neither an export folder (manifest.json) nor a .ckpt checkpoint")


def describe(embedder: Embedder) -> str:
    """`embedder.describe()`, or its class name for embedders without one."""
    fn = getattr(embedder, "describe", None)
    return fn() if callable(fn) else type(embedder).__name__
