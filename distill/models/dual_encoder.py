"""The student dual encoder: a timm image backbone and a Hugging Face text encoder."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.io import atomic_folder
from distill.models._hf import (
    check_source,
    load_pretrained,
    load_tokenizer,
    skeleton,
    vocabulary_signature,
)
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm, masked_mean
from distill.models.inherit import keep_layers, text_layers_problem
from distill.models.intermediate import LayerSpec, LayerStack, probe
from distill.models.stacks import HFStack, TimmStack
from distill.pixels import PixelSpec, from_timm
from distill.registry import MODELS

TIMM_SOURCES = ("local-dir:", "hf-hub:")
TRANSFORMS = ("auto", "timm", "square")


def tower_pixels(tower: nn.Module, image_size: int, mode: str, pretrained: bool) -> PixelSpec:
    """A timm tower's image preprocessing at `image_size` (see `DualEncoder`'s `image_transform`)."""
    from timm.data import resolve_data_config  # timm: heavy, imported when a model loads

    config = resolve_data_config({"input_size": (3, image_size, image_size)}, model=tower)
    if mode == "timm" or (mode == "auto" and pretrained):
        return from_timm(config)
    return PixelSpec(size=image_size, mean=tuple(config["mean"]), std=tuple(config["std"]))


def _check_timm(name: str) -> None:
    import timm  # timm: heavy, imported when a model loads

    if name.startswith("local-dir:"):
        folder = name.split(":", 1)[1]
        if not (Path(folder).expanduser() / "config.json").is_file():
            raise ConfigError(f"timm folder {folder!r} has no config.json (expected a timm save_for_hf folder)")
        return
    if name.startswith("hf-hub:"):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}")


def build_text_tower(text_model: str | None, text_config: dict[str, Any] | None, vocab: int) -> nn.Module:
    """A Hugging Face encoder from a hub id / folder, or from a config mapping (random init)."""
    from transformers import (  # transformers: heavy, imported when a model loads
        AutoConfig,
        AutoModel,
    )

    if text_model:
        return load_pretrained(AutoModel, text_model, "text model")
    cfg = dict(text_config or {})
    model_type = cfg.pop("model_type", "bert")
    cfg.setdefault("vocab_size", vocab)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))


def text_config_of(text_model: str | None, text_config: dict[str, Any] | None) -> Any:
    """The `transformers` config of a text tower (`build_text_tower`'s), read without weights."""
    from transformers import AutoConfig  # transformers: heavy, imported when a model loads

    if text_model:
        return load_pretrained(AutoConfig, text_model, "text model")
    cfg = dict(text_config or {})
    return AutoConfig.for_model(cfg.pop("model_type", "bert"), **cfg)


def text_sequence(tokenizer: str | None, max_length: int) -> str:
    """`LayerSpec.sequence` of a text tower: its vocabulary and maximum length."""
    return f"{vocabulary_signature(tokenizer)}|{max_length}"


def _check_text_layers(text_model: str | None, text_config: dict[str, Any] | None, layers: int | list[int]) -> None:
    from transformers import AutoConfig  # transformers: heavy, imported when a model loads

    if text_model:
        n = load_pretrained(AutoConfig, text_model, "text model").num_hidden_layers
    else:
        n = (text_config or {}).get("num_hidden_layers", 12)  # the transformers default
    problem = text_layers_problem(layers, int(n))
    if problem:
        raise ConfigError(problem)


@MODELS.register("dual_encoder")
class DualEncoder(Encoder):
    """Image tower (timm, by name) and text tower (transformers), each projected to `embed_dim`.

    Args:
        image_model: A timm model name, e.g. `resnet18`, `vit_small_patch16_224`, or a timm
            source `local-dir:/folder` / `hf-hub:org/name` (loaded with its weights).
        image_pretrained: Optional local file of timm weights (`pretrained_cfg_overlay`).
        image_size: Resolution the data pipeline feeds this model.
        image_transform: How images are resized: `timm` is timm's own eval transform for the
            tower (its pretrained config's interpolation, crop_pct, crop_mode, mean, std) at
            `image_size`; `square` resizes the shorter side to `image_size` (bicubic) and
            centre-crops, with the tower's mean and std; `auto` (default) is `timm` for a
            tower loaded with pretrained weights and `square` for one trained from scratch.
        image_args: Extra timm `create_model` arguments (e.g. `{depth: 4}` for a small ViT).
        text_model: Hub id or local folder for `AutoModel.from_pretrained`; or None to build
            from `text_config`.
        text_config: `AutoConfig.for_model` arguments, `model_type` included (default bert).
        text_layers: Keep only the first k blocks (an int) or the listed ones of the text
            tower: a 2/4/6-layer text student made of a teacher's own layers (ConaCLIP).
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
        image_transform: str = "auto",
        image_args: dict[str, Any] | None = None,
        text_model: str | None = None,
        text_config: dict[str, Any] | None = None,
        text_layers: int | list[int] | None = None,
        tokenizer: str | None = None,
        embed_dim: int = 256,
        pooling: str = "mean",
        max_length: int = 32,
    ) -> None:
        super().__init__()
        import timm  # timm: heavy, imported when a model loads

        self.image_size, self.pooling, self.max_length = image_size, pooling, max_length
        self.embed_dim = embed_dim
        extra: dict[str, Any] = dict(image_args or {})
        if image_pretrained:
            extra["pretrained_cfg_overlay"] = {"file": image_pretrained}
        pretrained = bool(image_pretrained) or image_model.startswith(TIMM_SOURCES)
        self.image_tower = timm.create_model(image_model, pretrained=pretrained, num_classes=0, **extra)
        self.image_args = dict(image_args or {})
        self.pixels = tower_pixels(self.image_tower, image_size, image_transform, pretrained)
        # timm: head_hidden_size is the pooled width after a pre-logits head (MobileNetV3), if any
        width = getattr(self.image_tower, "head_hidden_size", None) or self.image_tower.num_features
        self.image_proj = nn.Linear(width, embed_dim)
        self.tokenizer = load_tokenizer(tokenizer or text_model)
        self.sequence = text_sequence(tokenizer or text_model, max_length)
        self.text_tower = build_text_tower(text_model, text_config, len(self.tokenizer))
        if text_layers is not None:
            keep_layers(self.text_tower, text_layers)
        self.text_proj = nn.Linear(self.text_tower.config.hidden_size, embed_dim)

    @classmethod
    def describe(
        cls,
        *,
        image_model: str = "resnet18",
        image_pretrained: str | None = None,
        text_model: str | None = None,
        text_config: dict[str, Any] | None = None,
        text_layers: int | list[int] | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        embed_dim: int = 256,
        image_transform: str = "auto",
        **_: Any,
    ) -> dict[str, int]:
        problems = []
        for check in (
            lambda: _check_timm(image_model),
            lambda: text_model and check_source(text_model, "text model"),
            lambda: tokenizer and check_source(tokenizer, "tokenizer"),
            lambda: text_layers is not None and _check_text_layers(text_model, text_config, text_layers),
        ):
            try:
                check()
            except ConfigError as e:
                problems.extend(e.problems)
        if image_pretrained:
            if not Path(image_pretrained).expanduser().is_file():
                problems.append(f"image_pretrained file {image_pretrained!r} does not exist")
        if image_transform not in TRANSFORMS:
            problems.append(f"image_transform must be one of {', '.join(TRANSFORMS)}, got {image_transform!r}")
        if pooling not in ("cls", "mean"):
            problems.append(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if problems:
            raise ConfigError(problems)
        return {"image": embed_dim, "text": embed_dim}

    @classmethod
    def layer_outputs(
        cls,
        *,
        image_model: str = "resnet18",
        image_size: int = 64,
        image_args: dict[str, Any] | None = None,
        text_model: str | None = None,
        text_config: dict[str, Any] | None = None,
        text_layers: int | list[int] | None = None,
        tokenizer: str | None = None,
        max_length: int = 32,
        **_: Any,
    ) -> dict[str, dict[str, LayerSpec]]:
        import timm  # timm: heavy, imported when a model loads

        try:
            with torch.device("meta"):
                image = timm.create_model(image_model, pretrained=False, num_classes=0, **dict(image_args or {})).eval()
        except (RuntimeError, ValueError, TypeError, OSError) as e:
            raise ConfigError(f"cannot build timm model {image_model!r} to read its layers: {e}") from e
        text = skeleton(text_config_of(text_model, text_config))
        if text_layers is not None:
            keep_layers(text, text_layers)
        stack = HFStack(text, text, int(text.config.num_hidden_layers), text=True,
                        sequence=text_sequence(tokenizer or text_model, max_length), max_positions=max_length)
        return probe({  # no attention mask: building one reads values, which meta tensors have not
            "image": (TimmStack(image), lambda: image(torch.zeros(2, 3, image_size, image_size))),
            "text": (stack, lambda: text(input_ids=torch.zeros(2, 8, dtype=torch.long))),
        })

    def layer_stack(self, output: str) -> LayerStack:
        if output == "image":
            return TimmStack(self.image_tower)
        if output == "text":
            return HFStack(self.text_tower, self.text_tower, int(self.text_tower.config.num_hidden_layers), text=True,
                           sequence=self.sequence, max_positions=self.max_length)
        return super().layer_stack(output)

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(**vars(self.pixels))

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.max_length)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(self.image_proj(self.image_tower(pixel_values)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, attention_mask)
        return l2norm(self.text_proj(pooled))


    def save_pretrained(self, folder: str | Path) -> Path:
        """Save as a towers folder: each tower in its own library's format.

        `image/` is a timm `save_for_hf` folder (`timm.create_model("local-dir:...")` loads
        it), `text/` and `tokenizer/` are `save_pretrained` folders, `heads.safetensors`
        holds the two projections and `towers.json` the remaining settings. Written to a
        temporary folder and renamed, so a crash never leaves half a teacher behind.
        """
        from timm.models import save_for_hf  # timm: heavy, imported when a model loads

        with atomic_folder(folder) as tmp:
            save_for_hf(self.image_tower, str(tmp / "image"), model_args=self.image_args, safe_serialization=True)
            self.text_tower.save_pretrained(tmp / "text")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            heads = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
            heads.update({f"text_proj.{k}": v for k, v in self.text_proj.state_dict().items()})
            save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
            settings = {"embed_dim": self.embed_dim, "image_size": self.image_size, "pooling": self.pooling,
                        "max_length": self.max_length, "image_mean": list(self.pixels.mean),
                        "image_std": list(self.pixels.std), "pixels": self.pixels.to_dict()}
            (tmp / "towers.json").write_text(json.dumps(settings, indent=2))
        return Path(folder)


def read_towers(path: str) -> dict[str, Any]:
    """The settings of a towers folder, or a one-line error naming the folder."""
    settings = Path(path).expanduser() / "towers.json"
    if not settings.parent.is_dir():
        raise ConfigError(f"towers folder {path!r} does not exist")
    if not settings.is_file():
        raise ConfigError(f"{path!r} is not a towers folder (no towers.json; write one with save_pretrained)")
    return json.loads(settings.read_text())


@MODELS.register("towers")
class Towers(DualEncoder):
    """A dual encoder saved by `DualEncoder.save_pretrained`: a timm image tower and a
    Hugging Face text tower, each loaded from its own library's format.

    Args:
        path: The towers folder.
    """

    def __init__(self, *, path: str) -> None:

        root = Path(path).expanduser()
        s = read_towers(path)
        super().__init__(
            image_model=f"local-dir:{root / 'image'}", image_size=s["image_size"],
            text_model=str(root / "text"), tokenizer=str(root / "tokenizer"),
            embed_dim=s["embed_dim"], pooling=s["pooling"], max_length=s["max_length"], image_transform="square",
        )
        # the preprocessing the towers were trained with (older folders: square, their statistics)
        self.pixels = PixelSpec.from_dict(s["pixels"]) if "pixels" in s else PixelSpec(
            size=s["image_size"], mean=tuple(s["image_mean"]), std=tuple(s["image_std"]))
        heads = load_file(str(root / "heads.safetensors"))
        self.image_proj.load_state_dict({k[11:]: v for k, v in heads.items() if k.startswith("image_proj.")})
        self.text_proj.load_state_dict({k[10:]: v for k, v in heads.items() if k.startswith("text_proj.")})

    @classmethod
    def describe(cls, *, path: str, **_: Any) -> dict[str, int]:
        dim = int(read_towers(path)["embed_dim"])
        return {"image": dim, "text": dim}

    @classmethod
    def layer_outputs(cls, *, path: str, **_: Any) -> dict[str, dict[str, LayerSpec]]:  # type: ignore[override]
        root, s = Path(path).expanduser(), read_towers(path)
        return DualEncoder.layer_outputs(image_model=f"local-dir:{root / 'image'}", image_size=s["image_size"],
                                         text_model=str(root / "text"), tokenizer=str(root / "tokenizer"),
                                         max_length=s["max_length"])


__all__ = ["DualEncoder", "Towers", "build_text_tower"]
