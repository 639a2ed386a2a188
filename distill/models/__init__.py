"""Models (teachers and students). Importing this package registers them in `MODELS`."""

from distill.models import blip, dual_encoder, fusion, hf_clip, hf_text, tiny, twin  # noqa: F401
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess

__all__ = ["Encoder", "ImagePreprocess", "TextPreprocess"]
