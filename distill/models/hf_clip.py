"""Teachers (or students) that are `transformers` CLIP-family models."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.models._hf import load_image_spec, load_pretrained, skeleton, vocabulary_signature
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm
from distill.models.intermediate import LayerSpec, LayerStack, probe
from distill.models.stacks import HFStack
from distill.registry import MODELS


def _features(out: Any) -> Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_stacks(model: Any, sequence: str, max_length: int) -> dict[str, HFStack]:
    """The text and vision layer stacks of a CLIP-family model (`text_model`, `vision_model`);
    the vision stack's prefix is the class token when the embeddings have one (CLIP), none
    otherwise (SigLIP)."""
    stacks = {}
    config = model.config
    if hasattr(model, "vision_model"):
        prefix = 1 if hasattr(model.vision_model.embeddings, "class_embedding") else 0
        stacks["image"] = HFStack(model.vision_model, model, int(config.vision_config.num_hidden_layers),
                                  text=False, prefix=prefix)
    if hasattr(model, "text_model"):
        stacks["text"] = HFStack(model.text_model, model, int(config.text_config.num_hidden_layers), text=True,
                                 sequence=sequence, max_positions=max_length)
    return stacks


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
        self.sequence = f"{vocabulary_signature(path)}|{self.max_length}|{self.padding}"

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

    @classmethod
    def layer_outputs(cls, *, path: str, max_length: int = 77, **_: Any) -> dict[str, dict[str, LayerSpec]]:
        from transformers import AutoConfig  # transformers: heavy, imported when a model loads

        config = load_pretrained(AutoConfig, path, "model")
        model = skeleton(config)
        length = min(max_length, getattr(getattr(config, "text_config", None), "max_position_embeddings", 77))
        padding = "max_length" if config.model_type in ("siglip", "siglip2") else "longest"
        stacks = clip_stacks(model, f"{vocabulary_signature(path)}|{length}|{padding}", length)
        size = int(config.vision_config.image_size)
        runs = {"image": lambda: model.get_image_features(pixel_values=torch.zeros(2, 3, size, size)),
                "text": lambda: model.get_text_features(input_ids=torch.zeros(2, 8, dtype=torch.long))}
        return probe({output: (stack, runs[output]) for output, stack in stacks.items()})

    def layer_stack(self, output: str) -> LayerStack:
        stacks = clip_stacks(self.model, self.sequence, self.max_length)
        return stacks[output] if output in stacks else super().layer_stack(output)

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(**vars(self.pixels))

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length, padding=self.padding)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(_features(self.model.get_image_features(pixel_values=pixel_values)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return l2norm(_features(out))
