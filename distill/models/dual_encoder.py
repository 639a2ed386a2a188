"""The student dual encoder: a timm image backbone and a Hugging Face text encoder."""

from __future__ import annotations

import difflib
from typing import Any

from torch import Tensor, nn

from distill.errors import ConfigError
from distill.models._hf import check_source, load_pretrained, load_tokenizer
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm, masked_mean
from distill.registry import MODELS


def _check_timm(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}")


def build_text_tower(text_model: str | None, text_config: dict[str, Any] | None, vocab: int) -> nn.Module:
    """A Hugging Face encoder from a hub id / folder, or from a config mapping (random init)."""
    from transformers import AutoConfig, AutoModel

    if text_model:
        return load_pretrained(AutoModel, text_model, "text model")
    cfg = dict(text_config or {})
    model_type = cfg.pop("model_type", "bert")
    cfg.setdefault("vocab_size", vocab)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))


@MODELS.register("dual_encoder")
class DualEncoder(Encoder):
    """Image tower (timm, by name) and text tower (transformers), each projected to `embed_dim`.

    Args:
        image_model: A timm model name, e.g. `resnet18`, `vit_small_patch16_224`.
        image_pretrained: Optional local file of timm weights (`pretrained_cfg_overlay`).
        image_size: Resolution the data pipeline feeds this model.
        image_args: Extra timm `create_model` arguments (e.g. `{depth: 4}` for a small ViT).
        text_model: Hub id or local folder for `AutoModel.from_pretrained`; or None to build
            from `text_config`.
        text_config: `AutoConfig.for_model` arguments, `model_type` included (default bert).
        tokenizer: Hub id or folder; defaults to `text_model`'s, else the bundled tokenizer.
        embed_dim: Shared embedding width.
        pooling: `cls` (first token) or `mean` (masked mean) over the text states.
        max_length: Maximum tokens per caption.
    """

    def __init__(
        self,
        *,
        image_model: str = "resnet18",
        image_pretrained: str | None = None,
        image_size: int = 64,
        image_args: dict[str, Any] | None = None,
        text_model: str | None = None,
        text_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        embed_dim: int = 256,
        pooling: str = "mean",
        max_length: int = 32,
    ) -> None:
        super().__init__()
        import timm

        self.image_size, self.pooling, self.max_length = image_size, pooling, max_length
        extra: dict[str, Any] = dict(image_args or {})
        if image_pretrained:
            extra["pretrained_cfg_overlay"] = {"file": image_pretrained}
        self.image_tower = timm.create_model(
            image_model, pretrained=bool(image_pretrained), num_classes=0, **extra
        )
        cfg = self.image_tower.pretrained_cfg or {}
        self.image_mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.image_std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.image_proj = nn.Linear(self.image_tower.num_features, embed_dim)
        self.tokenizer = load_tokenizer(tokenizer or text_model)
        self.text_tower = build_text_tower(text_model, text_config, len(self.tokenizer))
        self.text_proj = nn.Linear(self.text_tower.config.hidden_size, embed_dim)

    @classmethod
    def describe(
        cls,
        *,
        image_model: str = "resnet18",
        image_pretrained: str | None = None,
        text_model: str | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        embed_dim: int = 256,
        **_: Any,
    ) -> dict[str, int]:
        problems = []
        for check in (
            lambda: _check_timm(image_model),
            lambda: text_model and check_source(text_model, "text model"),
            lambda: tokenizer and check_source(tokenizer, "tokenizer"),
        ):
            try:
                check()
            except ConfigError as e:
                problems.extend(e.problems)
        if image_pretrained:
            from pathlib import Path

            if not Path(image_pretrained).expanduser().is_file():
                problems.append(f"image_pretrained file {image_pretrained!r} does not exist")
        if pooling not in ("cls", "mean"):
            problems.append(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if problems:
            raise ConfigError(problems)
        return {"image": embed_dim, "text": embed_dim}

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(size=self.image_size, mean=self.image_mean, std=self.image_std)

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(self.image_proj(self.image_tower(pixel_values)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, attention_mask)
        return l2norm(self.text_proj(pooled))


__all__ = ["DualEncoder", "build_text_tower"]
