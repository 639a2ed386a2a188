"""Models (teachers and students). Importing this package registers them in `MODELS`."""

from distill.models import dual_encoder, hf_clip, tiny  # noqa: F401
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess

__all__ = ["Encoder", "ImagePreprocess", "TextPreprocess"]
