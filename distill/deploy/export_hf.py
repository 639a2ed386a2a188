"""`distill export --format hf`: a transformers student as a `save_pretrained` folder.

```
DIR/config.json, model.safetensors       the model (`AutoModel.from_pretrained(DIR)`)
DIR/tokenizer.json, tokenizer_config.json, ...   `AutoTokenizer.from_pretrained(DIR)`
DIR/preprocessor_config.json             `AutoImageProcessor.from_pretrained(DIR)`
```

The image processor is the one the student was loaded with (its `path`), saved as is, so
a user's `processor(images=...)` computes the pixels the student was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distill.models._hf import load_pretrained
from distill.models.hf_clip import HFClip

WEIGHTS = "model.safetensors"


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFFolder:
    """A `--format hf` export loaded by transformers alone: what the parity check compares."""

    def __init__(self, folder: Path, max_length: int, padding: str = "longest") -> None:
        from transformers import (  # transformers: heavy, imported when an export loads
            AutoImageProcessor,
            AutoModel,
            AutoTokenizer,
        )

        self.folder, self.max_length, self.padding = folder, max_length, padding
        self.manifest = {"image": {"file": WEIGHTS}, "text": {"file": WEIGHTS}}
        self.model = AutoModel.from_pretrained(str(folder)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.processor = AutoImageProcessor.from_pretrained(str(folder))

    def _run(self, fn: Any, **inputs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.functional.normalize(_features(fn(**inputs)), dim=-1).float().numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self._dim()), dtype=np.float32)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self._run(self.model.get_image_features, pixel_values=pixels)

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        if not captions:
            return np.zeros((0, self._dim()), dtype=np.float32)
        tokens = self.tokenizer(list(captions), padding=self.padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return self._run(self.model.get_text_features, input_ids=tokens["input_ids"],
                         attention_mask=tokens["attention_mask"])

    def _dim(self) -> int:
        return int(self.encode_texts(["a"]).shape[1])


def write_hf(encoder: HFClip, tmp: Path, args: dict[str, Any]) -> dict[str, Any]:
    """`save_pretrained` of the student's model, tokenizer and image processor into `tmp`.

    Args:
        encoder: The `hf_clip` student, fp32, eval.
        tmp: The folder being filled.
        args: The model's arguments in the checkpoint's config (`path`: where its image
            processor is read from).

    Returns:
        Notes for `distill_export.json`.
    """
    from transformers import AutoImageProcessor  # transformers: heavy, imported when a model loads

    encoder.model.save_pretrained(str(tmp))
    encoder.tokenizer.save_pretrained(str(tmp))
    load_pretrained(AutoImageProcessor, str(args["path"]), "image processor").save_pretrained(str(tmp))
    return {"architecture": type(encoder.model).__name__, "max_length": encoder.max_length,
            "padding": encoder.padding}
