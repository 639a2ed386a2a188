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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm
from distill.models.intermediate import LayerSpec, LayerStack, Tap, Unavailable, first, grid, probe
from distill.models.stacks import HFStack, TimmStack
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


class OpenClipStack(LayerStack):
    """The residual blocks of open_clip's own `Transformer` (its ViT and text towers).

    `hidden` is block i's output (`forward_intermediates`' index i). `attention` asks the
    block's `nn.MultiheadAttention` for its per-head weights (`need_weights=True,
    average_attn_weights=False`: PyTorch's unfused path) for that pass; `values` applies the
    value third of its `in_proj` to the block's attention input (one extra linear per layer
    read: `nn.MultiheadAttention` has no value module to hook). The custom blocks of
    qk-norm / scaled-cosine configs give `hidden` only.
    """

    def __init__(self, transformer: nn.Module, *, text: bool, prefix: int = 0, sequence: str | None = None,
                 max_positions: int | None = None) -> None:
        self.blocks = transformer.resblocks
        self.count, self.text, self.prefix = len(self.blocks), text, prefix
        self.sequence, self.max_positions = sequence, max_positions
        self.batch_first = bool(getattr(transformer, "batch_first", True))

    def tap(self, kind: str, index: int) -> Tap:
        block, prefix, batch_first = self.blocks[self.layer(index)], self.prefix, self.batch_first

        def nld(x: Tensor) -> Tensor:
            return x if batch_first else x.transpose(0, 1)

        if kind == "hidden":
            return Tap(block, lambda a, kw, o: nld(first(o)))
        if kind == "tokens" and not self.text:
            return Tap(block, lambda a, kw, o: nld(first(o))[:, prefix:])
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise Unavailable(f"open_clip's {type(block).__name__} (a qk-norm or scaled-cosine config) gives hidden only, "
                              f"no {kind}")
        heads, width = int(attn.num_heads), int(attn.embed_dim)
        if kind == "attention":
            return Tap(attn, lambda a, kw, o: o[1], heads=heads,
                       prepare=lambda a, kw: (a, {**kw, "need_weights": True, "average_attn_weights": False}))
        if kind == "values":
            def values(a: tuple, kw: dict, o: Any) -> Tensor:
                bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
                return nld(F.linear(a[2], attn.in_proj_weight[2 * width:], bias))

            return Tap(attn, values, heads=heads)
        raise Unavailable(f"no {kind} outputs")


class StageStack(LayerStack):
    """The stages of a CNN (open_clip's ModifiedResNet: layer1..layer4): hidden and tokens."""

    def __init__(self, stages: list[nn.Module], what: str) -> None:
        self.stages, self.count, self.what = stages, len(stages), what

    def tap(self, kind: str, index: int) -> Tap:
        if kind in ("hidden", "tokens"):
            return Tap(self.stages[self.layer(index)], lambda a, kw, o: grid(first(o)))
        raise Unavailable(f"{self.what} is a CNN: its stages have no {kind}")


def open_clip_stacks(model: nn.Module, sequence: str, context_length: int) -> dict[str, LayerStack]:
    """The image and text stacks of an open_clip model, whatever its towers (open_clip's ViT,
    a timm trunk, a ModifiedResNet; open_clip's text transformer or a Hugging Face encoder)."""
    stacks: dict[str, LayerStack] = {}
    visual = model.visual
    if hasattr(visual, "trunk"):  # TimmModel
        stacks["image"] = TimmStack(visual.trunk)
    elif hasattr(visual, "transformer"):
        stacks["image"] = OpenClipStack(visual.transformer, text=False, prefix=1)
    elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        stacks["image"] = StageStack([getattr(visual, f"layer{i}") for i in range(1, 5)], type(visual).__name__)
    text = getattr(model, "text", model)
    if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
        stacks["text"] = OpenClipStack(text.transformer, text=True, sequence=sequence, max_positions=context_length)
    elif hasattr(text, "transformer") and hasattr(text.transformer, "config"):  # HFTextEncoder
        hf = text.transformer
        stacks["text"] = HFStack(hf, hf, int(hf.config.num_hidden_layers), text=True, sequence=sequence,
                                 max_positions=context_length)
    return stacks


def text_sequence(cfg: dict[str, Any], context_length: int) -> str:
    """`LayerSpec.sequence` of an open_clip text tower: its tokenizer and context length."""
    text = cfg.get("text_cfg", {})
    return f"open_clip:{text.get('hf_tokenizer_name') or 'clip-bpe'}:{text.get('vocab_size', 49408)}|{context_length}"


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
        self.sequence = text_sequence(self.model_cfg, length)

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

    @classmethod
    def layer_outputs(
        cls, *, model: str, image_size: int | None = None, context_length: int | None = None,
        config: dict[str, Any] | None = None, model_args: dict[str, Any] | None = None, **_: Any,
    ) -> dict[str, dict[str, LayerSpec]]:
        open_clip = import_open_clip()
        cfg = architecture(model, config, image_size, context_length)
        extra = dict(model_args or {})
        if config:
            extra.update({k: v for k, v in cfg.items() if k in config})
        try:
            with torch.device("meta"):
                skeleton = open_clip.create_model(model, pretrained=None, load_weights=False, device="meta",
                                                  force_image_size=image_size, force_context_length=context_length,
                                                  **extra).eval()
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot build open_clip model {model!r} to read its layers: {reason}") from e
        length = int(cfg.get("text_cfg", {}).get("context_length", 77))
        size = cfg.get("vision_cfg", {}).get("image_size", 224)
        h, w = (size, size) if isinstance(size, int) else size
        stacks = open_clip_stacks(skeleton, text_sequence(cfg, length), length)
        runs = {"image": lambda: skeleton.encode_image(torch.zeros(2, 3, h, w)),
                "text": lambda: skeleton.encode_text(torch.zeros(2, length, dtype=torch.long))}
        return probe({output: (stack, runs[output]) for output, stack in stacks.items()})

    def layer_stack(self, output: str) -> LayerStack:
        stacks = open_clip_stacks(self.model, self.sequence, self.tokens.max_length)
        return stacks[output] if output in stacks else super().layer_stack(output)

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
