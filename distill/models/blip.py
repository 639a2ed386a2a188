"""Hugging Face BLIP image-text retrieval models as fused (pair-scoring) teachers.

BLIP (Li et al., ICML 2022, arXiv 2201.12086) scores a pair with its image-grounded text
encoder: the caption attends to the ViT's patch states by cross-attention and a two-way
ITM head reads the [CLS] state. The vision tower runs once per batch; the cross-attention
text encoder runs once per scored pair, so losses choose which pairs to pay for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distill.batch import ModelInputs
from distill.errors import ConfigError
from distill.models._hf import load_image_spec, load_pretrained
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess
from distill.models.fusion import PairScorer
from distill.registry import MODELS


@MODELS.register("blip_itm")
class BlipITM(Encoder):
    """`BlipForImageTextRetrieval` (e.g. `Salesforce/blip-itm-base-coco`) behind the `pair`
    node: `scores` is the ITM log-odds logit[match] - logit[no match], `features` the
    image-grounded [CLS] state (the ITM head's input).

    Args:
        path: Hub id or local `save_pretrained` folder (with its tokenizer and image processor).
        max_length: Maximum tokens per caption (capped by the position table).
        chunk_size: Pairs per cross-attention forward pass.
    """

    outputs = ("pair",)

    def __init__(self, *, path: str, max_length: int = 35, chunk_size: int = 64) -> None:
        super().__init__()
        from transformers import (  # transformers: heavy, imported when a model loads
            AutoTokenizer,
            BlipForImageTextRetrieval,
        )

        self.model = load_pretrained(BlipForImageTextRetrieval, path, "BLIP model")
        self.tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer")
        self.pixels = load_image_spec(path)  # the processor's own resize, crop and statistics
        self.max_length = min(max_length, self.model.config.text_config.max_position_embeddings)
        self.chunk_size = chunk_size

    @classmethod
    def describe(cls, *, path: str, **_: Any) -> dict[str, int]:
        from transformers import AutoConfig  # transformers: heavy, imported when a model loads

        config = load_pretrained(AutoConfig, path, "BLIP model")
        archs = list(getattr(config, "architectures", None) or [])
        if config.model_type != "blip" or (archs and "BlipForImageTextRetrieval" not in archs):
            what = ", ".join(archs) or config.model_type
            raise ConfigError(f"{path!r} is a {what} model, not a BLIP image-text retrieval (ITM) model")
        return {"pair": int(config.text_config.hidden_size)}

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(**vars(self.pixels))

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length)

    def encode(self, output: str, inputs: ModelInputs) -> PairScorer:  # type: ignore[override]
        if output != "pair":
            raise KeyError(f"blip_itm has no output {output!r}; it has 'pair'")
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        vision: list[Tensor] = []  # patch states of every image of the batch, computed on first use

        def run(i: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if not vision:
                vision.append(self.model.vision_model(pixel_values=pixels).last_hidden_state)
            image = vision[0][i.to(pixels.device)]
            t = t.to(ids.device)
            states = self.model.text_encoder(
                input_ids=ids[t], attention_mask=mask[t], encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
            ).last_hidden_state[:, 0]
            logits = self.model.itm_head(states)
            return logits[:, 1] - logits[:, 0], states

        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return PairScorer(run, n_images=len(pixels), n_texts=len(ids), grad=grad, chunk_size=self.chunk_size)


__all__ = ["BlipITM"]
