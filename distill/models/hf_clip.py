"""Teachers (or students) that are `transformers` CLIP-family models."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill.errors import ConfigError
from distill.models._hf import load_image_spec, load_pretrained
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm
from distill.registry import MODELS


def _features(out: Any) -> Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


@MODELS.register("hf_clip")
class HFClip(Encoder):
    """A CLIP-style dual encoder loaded with `from_pretrained` from a hub id or a folder.

    Works for any `transformers` model with `get_image_features` and `get_text_features`
    (CLIP, SigLIP, Chinese-CLIP, AltCLIP). Images are preprocessed exactly as the model's
    own image processor does (resize mode and filter, crop, mean and std, and its backend's
    arithmetic: CLIP resizes the shorter side and crops, SigLIP squashes to the full size);
    captions go through its own tokenizer.

    Args:
        path: Hub id (e.g. `openai/clip-vit-base-patch32`) or local `save_pretrained` folder.
        max_length: Maximum tokens per caption (capped by the model's position table).
    """

    def __init__(self, *, path: str, max_length: int = 77) -> None:
        super().__init__()
        from transformers import (  # transformers: heavy, imported when a model loads
            AutoModel,
            AutoTokenizer,
        )

        self.model = load_pretrained(AutoModel, path, "model")
        self.tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer")
        self.pixels = load_image_spec(path)
        positions = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)
        self.max_length = min(max_length, positions)
        # SigLIP's text tower pools its last position: captions padded to the full length, as it was trained
        self.padding = "max_length" if self.model.config.model_type in ("siglip", "siglip2") else "longest"

    @classmethod
    def describe(cls, *, path: str, **_: Any) -> dict[str, int]:
        from transformers import AutoConfig  # transformers: heavy, imported when a model loads

        config = load_pretrained(AutoConfig, path, "model")
        dim = getattr(config, "projection_dim", None)
        if dim is None and config.model_type in ("siglip", "siglip2"):  # no projection: the heads keep the width
            dim = config.vision_config.hidden_size
        if dim is None:
            raise ConfigError(f"{path!r} is a {config.model_type!r} config without projection_dim")
        return {"image": int(dim), "text": int(dim)}

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(**vars(self.pixels))

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length, padding=self.padding)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(_features(self.model.get_image_features(pixel_values=pixel_values)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return l2norm(_features(out))
