"""Models (teachers and students); `MODELS` imports every module here on first lookup."""

from distill.models.base import Encoder, ImagePreprocess, TextPreprocess

__all__ = ["Encoder", "ImagePreprocess", "TextPreprocess"]
