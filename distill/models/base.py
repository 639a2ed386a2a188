"""What every model (teacher or student) provides to the graph and to the data pipeline.

A model is registered in `MODELS` under a snake_case name. Its `__init__` takes typed
keyword-only arguments (the YAML `models.<name>.args`), checked against the signature
before anything loads. `describe(**args)` tells the output names and dimensions without
loading weights, so that the config check can compare edge endpoints early.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill.batch import ModelInputs
from distill.models.intermediate import LayerSpec, LayerStack, Tokens, Unavailable, record
from distill.pixels import PixelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess(PixelSpec):
    """How a model wants its images (`distill.pixels.PixelSpec`: resize mode, filter, crop,
    normalisation, each library's arithmetic), as a callable for the data pipeline. The
    defaults are this project's own: shorter side resized (bicubic), centre crop, ImageNet
    statistics."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    deterministic: ClassVar[bool] = True
    """False in a subclass that augments (random crops, flips): its model's outputs then
    differ per epoch and `distill.training.cache.store` refuses to cache them."""

    def __call__(self, image: Any) -> Tensor:
        """PIL image -> (3, H, W) float tensor."""
        return torch.from_numpy(self.to_array(image))


@dataclass(frozen=True)
class TextPreprocess:
    """How a model wants its captions: a Hugging Face tokenizer and a maximum length."""

    tokenizer: Any
    max_length: int = 32
    padding: str = "longest"
    """`longest` (pad to the batch's longest caption) or `max_length` (always `max_length`
    tokens: text towers that pool the last position, as SigLIP's does, were trained so)."""
    deterministic: ClassVar[bool] = True
    """False in a subclass that augments captions (token dropout, paraphrases); see above."""

    def key(self) -> tuple:
        """Identity used to share one tokenisation among models that agree."""
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        key = ("text", name, len(self.tokenizer), self.max_length)
        return key if self.padding == "longest" else (*key, self.padding)

    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        """Captions -> {"input_ids", "attention_mask"}, each (N, L) int64, padded to the longest."""
        enc = self.tokenizer(
            list(captions),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class Encoder(nn.Module):
    """Base class of every model node provider.

    Subclasses set `outputs` and implement `describe`, `encode` and the two preprocess
    accessors. `encode` returns L2-normalised embeddings of shape (N, dim).
    """

    outputs: ClassVar[tuple[str, ...]] = ("image", "text")

    @classmethod
    def describe(cls, **args: Any) -> dict[str, int]:
        """Output name -> embedding dimension, computed from the arguments without loading weights."""
        raise NotImplementedError

    def image_preprocess(self) -> ImagePreprocess | None:
        """The image preprocessing this model needs, or None if it reads no images."""
        return None

    def text_preprocess(self) -> TextPreprocess | None:
        """The text preprocessing this model needs, or None if it reads no text."""
        return None

    def encode(self, output: str, inputs: ModelInputs) -> Tensor:
        """Compute one output (`image` or `text`) for a batch of this model's inputs."""
        if output == "image":
            return self.encode_image(inputs["pixel_values"])
        if output == "text":
            return self.encode_text(inputs["input_ids"], inputs["attention_mask"])
        raise KeyError(f"{type(self).__name__} has no output {output!r}")

    @classmethod
    def layer_outputs(cls, **args: Any) -> dict[str, dict[str, LayerSpec]]:
        """Output -> layer kind (`hidden`, `tokens`, `attention`, `values`) -> `LayerSpec`,
        computed from the arguments without loading weights (a meta-device probe of the
        architecture, `distill.models.intermediate.probe`). {} for a model that is no stack of
        layers: it has no layer nodes.

        Raises:
            ConfigError: The architecture cannot be built from the arguments.
        """
        return {}

    def layer_stack(self, output: str) -> LayerStack:
        """The stack of layers behind `output`, whose taps read its layer nodes."""
        raise Unavailable(f"{type(self).__name__} has no layer outputs")

    def encode_layers(
        self, output: str, inputs: ModelInputs, wanted: Sequence[tuple[str, int]]
    ) -> tuple[Tensor, dict[tuple[str, int], Tokens]]:
        """`encode(output, inputs)` and, from the same forward pass, the layer nodes `wanted`
        as (kind, layer index) pairs: hooks on those layers only, removed afterwards."""
        stack = self.layer_stack(output)
        taps = {w: stack.tap(*w) for w in dict.fromkeys(wanted)}
        with record(taps) as got:
            final = self.encode(output, inputs)
        return final, {w: stack.tokens(w[0], got[w], inputs, taps[w].heads) for w in taps}

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, dim) L2-normalised."""
        raise NotImplementedError

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) token ids and mask -> (N, dim) L2-normalised."""
        raise NotImplementedError


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of (N, L, D) token states over the positions where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def l2norm(x: Tensor) -> Tensor:
    """Unit-length rows (in float32 for stability, returned in the input dtype)."""
    return torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
