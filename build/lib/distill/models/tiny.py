"""A tiny dual encoder for tests and smoke runs, registered like the real models."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill.models._hf import load_tokenizer
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm, masked_mean
from distill.registry import MODELS


@MODELS.register("tiny_dual")
class TinyDual(Encoder):
    """Pooled pixels -> MLP for images, mean of token embeddings -> MLP for text.

    Args:
        embed_dim: Output width of both towers.
        width: Hidden width.
        image_size: Input resolution the model asks the data pipeline for.
        pool: Images are average-pooled to pool x pool before the MLP.
        tokenizer: Hub id or folder of a tokenizer; the bundled one by default.
        max_length: Maximum tokens per caption.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 16,
        width: int = 32,
        image_size: int = 32,
        pool: int = 8,
        tokenizer: str | None = None,
        max_length: int = 24,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        self.image_size, self.pool, self.max_length = image_size, pool, max_length
        self.image_mlp = nn.Sequential(
            nn.Linear(3 * pool * pool, width), nn.GELU(), nn.Linear(width, embed_dim)
        )
        self.tokens = nn.Embedding(len(self.tokenizer), width)
        self.text_mlp = nn.Sequential(nn.GELU(), nn.Linear(width, embed_dim))

    @classmethod
    def describe(cls, *, embed_dim: int = 16, **_: object) -> dict[str, int]:
        return {"image": embed_dim, "text": embed_dim}

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(size=self.image_size)

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(pixel_values, self.pool).flatten(1)
        return l2norm(self.image_mlp(x))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return l2norm(self.text_mlp(masked_mean(self.tokens(input_ids), attention_mask)))
