"""Teachers (or students) that are `open_clip` models: LAION, DataComp, DFN, MobileCLIP,
TinyCLIP, SigLIP checkpoints, or any architecture open_clip can build.

`open_clip_torch` is an optional dependency (`pip install 'distill[open_clip]'`).
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from distill.errors import ConfigError
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm
from distill.pixels import PixelSpec
from distill.registry import MODELS

PRECISIONS = ("fp32", "fp16", "bf16")
SOURCES = ("hf-hub:", "local-dir:")


def import_open_clip() -> Any:
    """The `open_clip` module, or a one-line error naming the extra."""
    try:
        import open_clip  # open_clip: optional, imported when an open_clip model loads
    except ImportError as e:
        raise ConfigError("models of type open_clip need open_clip_torch: pip install 'distill[open_clip]'") from e
    return open_clip


def pixels_of(cfg: dict[str, Any]) -> PixelSpec:
    """The `PixelSpec` of an open_clip `preprocess_cfg` (open_clip's `image_transform`, eval):
    `shortest` resizes the shorter side and centre-crops, `squash` resizes to the size,
    `longest` fits the longer side and pads with `fill_color`."""
    size = cfg.get("size", 224)
    size = size if isinstance(size, int) else (int(size[0]), int(size[1])) if size[0] != size[1] else int(size[0])
    mean, std = tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"])
    mode = cfg.get("resize_mode") or "shortest"
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"  # `random` is bicubic
    if mode == "squash":
        return PixelSpec(size=size, mean=mean, std=std, resize="squash", crop=False, interpolation=interpolation)  # type: ignore[arg-type]
    if mode == "longest":
        return PixelSpec(size=size, mean=mean, std=std, resize="longest", interpolation=interpolation,  # type: ignore[arg-type]
                         fill=int(cfg.get("fill_color", 0)))
    if mode != "shortest":
        raise ConfigError(f"open_clip resize_mode {mode!r} is not supported (shortest, squash, longest)")
    if not isinstance(size, int):  # open_clip's ResizeKeepRatio here is always bicubic
        interpolation = "bicubic"
    return PixelSpec(size=size, mean=mean, std=std, resize="shortest", interpolation=interpolation)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OpenClipTokens(TextPreprocess):
    """Captions through an open_clip tokenizer: (N, context_length) ids at the model's full
    context length (a text tower that pools its last position, as SigLIP's does, needs the
    padding), and the mask of non-pad positions."""

    name: str = ""
    pad_id: int = 0

    def key(self) -> tuple:
        return ("open_clip_text", self.name, type(self.tokenizer).__name__, self.max_length)

    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        ids = self.tokenizer(list(captions), context_length=self.max_length).long()
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}


def _pretrained_problem(model: str, pretrained: str | None) -> str | None:
    """A one-line reason the weights source cannot load offline, or None."""
    if not pretrained:
        return None
    if model.startswith(SOURCES):
        return f"pretrained {pretrained!r} is ignored by open_clip for a {model.split(':')[0]}: model; leave it out"
    if pretrained.startswith(("/", "./", "../", "~")) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).expanduser().is_file():
            return f"pretrained checkpoint file {pretrained!r} does not exist"
        return None
    open_clip = import_open_clip()
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        known = ", ".join(tags) or "none"
        return f"{model!r} has no pretrained tag {pretrained!r} (open_clip knows: {known})"
    return None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, mappings key by key (a copy)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def architecture(model: str, config: dict[str, Any] | None, image_size: int | None,
                 context_length: int | None) -> dict[str, Any]:
    """The open_clip model config `create_model` builds for these arguments."""
    open_clip = import_open_clip()
    if model.startswith("local-dir:"):
        folder = Path(model.split(":", 1)[1]).expanduser()
        base = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    elif model.startswith("hf-hub:"):
        base = open_clip.factory._get_hf_config(model.split(":", 1)[1])["model_cfg"]
    else:
        base = open_clip.get_model_config(model) or {}
    cfg = merge(base, config or {})
    if image_size is not None:
        cfg.setdefault("vision_cfg", {})["image_size"] = image_size
    if context_length is not None:
        cfg.setdefault("text_cfg", {})["context_length"] = context_length
    return cfg


@MODELS.register("open_clip")
class OpenClip(Encoder):
    """An open_clip model (`open_clip.create_model`) behind the `image` and `text` nodes:
    `encode_image` / `encode_text`, L2-normalised. Images are preprocessed exactly as
    open_clip's own eval transform for this model (its `preprocess_cfg`: size, mean, std,
    interpolation, resize mode, fill), captions with its own tokenizer
    (`open_clip.get_tokenizer`).

    Args:
        model: An open_clip architecture name (`ViT-B-32`, `MobileCLIP-S1`, `ViT-B-16-SigLIP`,
            see `open_clip.list_models()`), or a `hf-hub:org/name` / `local-dir:/folder`
            source (a folder with `open_clip_config.json`, as `distill export --format
            open_clip` writes).
        pretrained: An open_clip tag (`laion2b_s34b_b79k`, see
            `open_clip.list_pretrained_tags_by_model`) or a local checkpoint file; None
            for random weights. Tags and hub ids download unless already in the cache.
        image_size: Override the architecture's image size (open_clip's `force_image_size`;
            position embeddings are resized when weights load).
        precision: Weights' precision, `fp32`, `fp16` or `bf16` (a frozen teacher in half
            precision halves its memory; a trained student should stay fp32).
        context_length: Override the text context length (`force_context_length`).
        config: Deep-merged onto the architecture's open_clip config: a smaller student of
            the same family, e.g. `{vision_cfg: {width: 384, layers: 6}, text_cfg: {layers: 6}}`
            (TinyCLIP-style; `init:` then inherits the teacher's layers and leading slices).
        model_args: Further `open_clip.create_model` keyword arguments (`force_quick_gelu`, ...).
    """

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None = None,
        image_size: int | None = None,
        precision: str = "fp32",
        context_length: int | None = None,
        config: dict[str, Any] | None = None,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        open_clip = import_open_clip()
        self.name = model
        self.model_cfg = architecture(model, config, image_size, context_length)
        """The open_clip `model_cfg` this model was built with (an export writes it)."""
        extra = dict(model_args or {})
        if config:  # create_model replaces these keys whole: hand it the merged ones
            extra.update({k: v for k, v in self.model_cfg.items() if k in config})
        try:
            self.model = open_clip.create_model(
                model, pretrained=pretrained, precision=precision, force_image_size=image_size,
                force_context_length=context_length, **extra,
            )
            length = context_length or self.model_cfg.get("text_cfg", {}).get("context_length")
            tokenizer = open_clip.get_tokenizer(model, context_length=length)
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load open_clip model {model!r} (pretrained {pretrained!r}): {reason}") from e
        self.pixels = pixels_of(self.model.visual.preprocess_cfg)
        length = int(getattr(tokenizer, "context_length", None) or context_length or 77)
        pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
        self.tokens = OpenClipTokens(tokenizer=tokenizer, max_length=length, name=model, pad_id=int(pad or 0))

    @classmethod
    def describe(
        cls, *, model: str, pretrained: str | None = None, precision: str = "fp32",
        config: dict[str, Any] | None = None, **_: Any,
    ) -> dict[str, int]:
        open_clip = import_open_clip()
        problems = []
        if precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        cfg: dict[str, Any] | None = None
        if model.startswith("local-dir:"):
            folder = Path(model.split(":", 1)[1]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                problems.append(f"open_clip folder {str(folder)!r} has no open_clip_config.json")
            else:
                cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg")
        elif not model.startswith("hf-hub:"):
            cfg = open_clip.get_model_config(model)
            if cfg is None:
                close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"unknown open_clip model {model!r}{hint}")
        if not problems:
            problem = _pretrained_problem(model, pretrained)
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        if cfg is None:  # a hub model: its config from the Hugging Face cache (or a download)
            try:
                cfg = open_clip.factory._get_hf_config(model.split(":", 1)[1])["model_cfg"]
            except Exception as e:  # noqa: BLE001 - hub errors come in many types; one line says why
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"cannot read the config of open_clip model {model!r} (offline, only a "
                                  f"cached download or a local-dir: folder loads): {reason}") from e
        dim = int(merge(cfg, config or {})["embed_dim"])
        return {"image": dim, "text": dim}

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(**vars(self.pixels))

    def text_preprocess(self) -> TextPreprocess:
        return self.tokens

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.visual.parameters()).dtype
        return l2norm(self.model.encode_image(pixel_values.to(dtype)).float())

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return l2norm(self.model.encode_text(input_ids).float())


__all__ = ["OpenClip", "OpenClipTokens", "import_open_clip", "pixels_of"]
