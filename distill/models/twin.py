"""The shared-weight twin encoder: one transformer for both modalities (VLDeformer).

VLDeformer (Zhang et al., Knowledge-Based Systems 2022, arXiv 2110.11338) decomposes an
early-interaction transformer: the same weights run on the image alone and on the text
alone, read out as the mean over positions then tanh. Here the backbone is the `fusion`
teacher's, with the same parameter names, so a trained fusion folder initialises it
(`path:`), or `init: {from: <fusion model>, tensors: {backbone: backbone}}` does in-config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from distill.models._hf import load_tokenizer, vocabulary_signature
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess
from distill.models.fusion import (
    ARCH,
    FusionBackbone,
    FusionStack,
    architecture,
    check_architecture,
    described_layers,
    save_folder,
)
from distill.models.intermediate import LayerSpec, LayerStack
from distill.registry import MODELS

KINDS = ("fusion", "twin")


@MODELS.register("twin")
class Twin(Encoder):
    """One `FusionBackbone` encoding images and captions separately; embeddings are
    l2norm(tanh(mean over positions)), of width `width` (the same as a fusion teacher's
    `image` / `text` outputs, so a twin loaded from a fusion folder starts equal to them).

    Args:
        path: A `fusion` or `twin` folder written by `save_pretrained`: the backbone and
            tokenizer are loaded from it (a fusion teacher's ITM head is dropped) and its
            settings replace the architecture and `tokenizer` arguments (then left out).
        width: Token width. depth: Blocks. heads: Attention heads. mlp_ratio: MLP width / width.
        image_size: Input resolution. patch_size: Square patch side.
        max_length: Maximum tokens per caption.
        tokenizer: Hub id or folder; the bundled tokenizer by default.
    """

    outputs = ("image", "text")

    def __init__(
        self, *, path: str | None = None, width: int = 256, depth: int = 4, heads: int = 4,
        mlp_ratio: float = 4.0, image_size: int = 64, patch_size: int = 8, max_length: int = 40,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        arch = dict(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, image_size=image_size,
                    patch_size=patch_size, max_length=max_length)
        given = {k: v for k, v in arch.items() if v != ARCH[k]} | ({"tokenizer": tokenizer} if tokenizer else {})
        self.arch = architecture("twin", KINDS, path, given)
        check_architecture(self.arch)
        source = str(Path(path).expanduser() / "tokenizer") if path else tokenizer
        self.tokenizer = load_tokenizer(source)
        self.sequence = f"{vocabulary_signature(source)}|{self.arch['max_length']}|cls"
        self.backbone = FusionBackbone(vocab=len(self.tokenizer), **self.arch)
        if path:

            state = load_file(str(Path(path).expanduser() / "model.safetensors"))
            self.backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})

    @classmethod
    def describe(cls, *, path: str | None = None, **args: Any) -> dict[str, int]:
        arch = architecture("twin", KINDS, path, args)
        check_architecture(arch)
        return {"image": int(arch["width"]), "text": int(arch["width"])}

    @classmethod
    def layer_outputs(cls, *, path: str | None = None, **args: Any) -> dict[str, dict[str, LayerSpec]]:
        return described_layers("twin", KINDS, path, args)

    def layer_stack(self, output: str) -> LayerStack:
        if output in ("image", "text"):
            return FusionStack(self.backbone, output, self.sequence)
        return super().layer_stack(output)

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(size=self.arch["image_size"])

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.arch["max_length"])

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.backbone.encode_alone(self.backbone.embed_image(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone.encode_alone(self.backbone.embed_text(input_ids, attention_mask))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a twin folder that `twin` loads with `path:`."""
        return save_folder(self, self.tokenizer, "twin", self.arch, folder)


__all__ = ["Twin"]
