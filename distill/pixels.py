"""Image preprocessing exactly as each model's own library does it: one spec, two pipelines.

A `PixelSpec` says how a model wants its images (what its library's image processor or
eval transform does), and `to_array` turns a PIL image into the float32 array the model
reads. Training, evaluation, the teacher cache and exported models (ONNX runtime without
torch) all call this one function, so they agree to the last bit.

The two pipelines are the two ways the libraries compute pixels:
- `pil` (timm's and open_clip's eval transforms, torchvision transforms on PIL images, this
  project's own models): PIL resizes (PIL's own antialiasing), crop offsets rounded
  (`round((h - crop) / 2)`), then `/ 255` and `(x - mean) / std` in float32.
- `tensor` (transformers' image processors, whose default backend in transformers 5 is
  torchvision on uint8 tensors): `torchvision.transforms.v2.functional.resize` of the uint8
  tensor with antialias, crop offsets truncated, and rescale fused into the normalisation
  (`(x - 255 mean) / (255 std)`), as `TorchvisionBackend` does.

Resize modes (`resize`):
- `shortest`: the shorter side to `resize_size` (an int; the longer side `int(s * long /
  short)`, torchvision's rule) or, for an (h, w) target, the aspect ratio kept so that the
  image covers it (timm's and open_clip's `ResizeKeepRatio`); then centre crop to `size`.
- `squash`: resize to `resize_size` exactly, aspect ratio ignored (SigLIP); crop if larger.
- `longest`: the aspect ratio kept so that the image fits inside `resize_size`, then padded
  with `fill` and centre-cropped to `size` (open_clip's `resize_mode: longest`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from distill.augment import apply_view
from distill.errors import ConfigError

RESIZE_MODES = ("shortest", "squash", "longest")
BACKENDS = ("pil", "tensor")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}  # fmt: skip
PIL_CODES = {int(v): k for k, v in INTERPOLATIONS.items()}
"""PIL's resample integers (as in Hugging Face `preprocessor_config.json`) -> our names."""

Size = tuple[int, int]


def pair(size: int | tuple[int, int] | list[int]) -> Size:
    """(height, width) of an int or a 2-sequence."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


@dataclass(frozen=True)
class PixelSpec:
    """How one model wants its images.

    Args:
        size: Output (height, width) or a square side.
        mean, std: Per-channel normalisation in [0, 1] units.
        resize: `shortest`, `squash` or `longest` (see the module docstring).
        resize_size: The resize target; None means `size`.
        crop: Centre-crop (or pad) to `size` after resizing.
        interpolation: PIL resample filter name (`bicubic`, `bilinear`, ...).
        backend: `pil` or `tensor` (see the module docstring).
        fill: Padding grey level (0-255) for `longest`.
        floor_crop: Truncate the crop offsets (Hugging Face's numpy `center_crop`) instead of
            rounding them (torchvision's, open_clip's); the `tensor` backend always truncates.
    """

    size: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"
    resize_size: int | tuple[int, int] | None = None
    crop: bool = True
    interpolation: str = "bicubic"
    backend: str = "pil"
    fill: int | tuple[int, int, int] = 0
    floor_crop: bool = False

    def __post_init__(self) -> None:
        for name in ("size", "resize_size"):  # (s, s) is s: a square target, as timm and open_clip read it
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                h, w = (int(v) for v in value)
                object.__setattr__(self, name, h if h == w else (h, w))
        problems = []
        if self.resize not in RESIZE_MODES:
            problems.append(f"image resize mode {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"image interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.backend not in BACKENDS:
            problems.append(f"image preprocessing backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if min(pair(self.size)) < 1 or min(pair(self.target)) < 1:
            problems.append(f"image size {self.size!r} / resize size {self.resize_size!r} must be positive")
        if problems:
            raise ConfigError(problems)

    @property
    def target(self) -> int | tuple[int, int]:
        return self.size if self.resize_size is None else self.resize_size

    @property
    def out_size(self) -> Size:
        """(height, width) of the arrays `to_array` returns."""
        return pair(self.size) if self.crop or self.resize == "longest" else pair(self.target)

    def key(self) -> tuple:
        """Identity of the pixels: two specs with equal keys give identical arrays."""
        extra = (self.resize, self.resize_size, self.crop, self.interpolation, self.backend, self.fill,
                 self.floor_crop)
        base = ("image", self.size, tuple(self.mean), tuple(self.std))
        # the defaults keep the key every cache entry before these options was written with
        return base if extra == ("shortest", None, True, "bicubic", "pil", 0, False) else (*base, *extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (an export manifest's `image` entry)."""
        size = self.size if isinstance(self.size, int) else list(self.size)
        rs = self.resize_size if self.resize_size is None or isinstance(self.resize_size, int) else list(self.resize_size)
        return {"size": size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "resize_size": rs, "crop": self.crop, "interpolation": self.interpolation,
                "backend": self.backend, "fill": self.fill if isinstance(self.fill, int) else list(self.fill),
                "floor_crop": self.floor_crop}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelSpec:
        """Inverse of `to_dict`; missing options take the defaults (older manifests)."""
        size = d["size"] if isinstance(d["size"], int) else tuple(d["size"])
        rs = d.get("resize_size")
        return cls(size=size, mean=tuple(d["mean"]), std=tuple(d["std"]), resize=d.get("resize", "shortest"),
                   resize_size=rs if rs is None or isinstance(rs, int) else tuple(rs), crop=d.get("crop", True),
                   interpolation=d.get("interpolation", "bicubic"), backend=d.get("backend", "pil"),
                   fill=fill if isinstance(fill := d.get("fill", 0), int) else tuple(fill),
                   floor_crop=d.get("floor_crop", False))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (3, H, W) float32, as the model's own library computes it."""
        image = image.convert("RGB")
        if self.backend == "tensor":
            return _tensor_pipeline(self, image)
        w, h = image.size
        new_h, new_w = resized_shape(self, h, w)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
        if self.crop or self.resize == "longest":
            image = _crop_or_pad(image, pair(self.size), self.fill, self.floor_crop)
        return self._normalise(image)

    def view_array(self, image: Image.Image, view: Any) -> np.ndarray:
        """A training view (`distill.augment.View`) of `image` -> (3, H, W) float32 at this
        model's output size and normalisation: the view's crop resized to `out_size` (as
        `RandomResizedCrop` does, aspect ratio not kept), flipped and recoloured. Views
        are computed by PIL whatever the `backend`: they are training inputs, not a
        library's eval transform to match."""
        return self._normalise(apply_view(image, view, self.out_size, INTERPOLATIONS[self.interpolation]))

    def _normalise(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels - mean) / std


def resized_shape(spec: PixelSpec, h: int, w: int) -> Size:
    """(height, width) after the resize step, by each library's rounding rule."""
    target = spec.target
    if spec.resize == "squash":
        return pair(target)
    if spec.resize == "shortest" and isinstance(target, int):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(target * long / short)
        return (new_long, target) if w <= h else (target, new_long)
    th, tw = pair(target)  # ResizeKeepRatio: cover (shortest) or fit inside (longest)
    ratio = max(h / th, w / tw) if spec.resize == "longest" else min(h / th, w / tw)
    return (round(h / ratio), round(w / ratio))


def _crop_or_pad(image: Image.Image, size: Size, fill: int | tuple[int, int, int], floor: bool) -> Image.Image:
    """Centre crop to (h, w), padding first with `fill` where the image is smaller."""
    ch, cw = size
    w, h = image.size
    if cw > w or ch > h:
        colour = (fill, fill, fill) if isinstance(fill, int) else tuple(fill)
        padded = Image.new("RGB", (max(w, cw), max(h, ch)), colour)
        padded.paste(image, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
        image, (w, h) = padded, padded.size
    offset = (lambda d: d // 2) if floor else (lambda d: int(round(d / 2.0)))
    top, left = offset(h - ch), offset(w - cw)
    if (left, top, w, h) == (0, 0, cw, ch):
        return image
    return image.crop((left, top, left + cw, top + ch))


def _tensor_pipeline(spec: PixelSpec, image: Image.Image) -> np.ndarray:
    """The transformers `TorchvisionBackend` path: uint8 tensor resize, truncated crop, fused scale."""
    import torch  # torch: only for the tensor backend
    from torchvision.transforms.v2 import functional as F

    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    h, w = x.shape[-2:]
    new_h, new_w = resized_shape(spec, h, w)
    if (new_h, new_w) != (h, w):
        mode = getattr(F.InterpolationMode, spec.interpolation.upper())
        x = F.resize(x, [new_h, new_w], interpolation=mode, antialias=True)
    if spec.crop:
        ch, cw = pair(spec.size)
        h, w = x.shape[-2:]
        if cw > w or ch > h:
            x = F.pad(x, [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
                          (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0], fill=0)
            h, w = x.shape[-2:]
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        x = x[:, top : top + ch, left : left + cw]
    mean = torch.tensor(spec.mean) * 255.0
    std = torch.tensor(spec.std) * 255.0
    return ((x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]).numpy()


def from_hf_processor(processor: Any, where: str) -> PixelSpec:
    """The `PixelSpec` of a transformers image processor (CLIP, SigLIP, BLIP, ...).

    Reads what the processor does: resize (shortest edge, or height x width), resample
    filter, centre crop, mean and std; the backend is `tensor` for the torchvision
    processors and `pil` for the `...Pil` ones. Refuses what it cannot reproduce."""
    def get(name: str) -> Any:
        return getattr(processor, name, None)

    size = _set_fields(get("size"))
    if get("do_resize") is False:
        raise ConfigError(f"{where}: an image processor that does not resize cannot feed fixed-size batches")
    if size.get("shortest_edge"):
        if size.get("longest_edge"):
            raise ConfigError(f"{where}: resize with both shortest_edge and longest_edge is not supported")
        resize, resize_size = "shortest", int(size["shortest_edge"])
    elif size.get("height") and size.get("width"):
        resize, resize_size = "squash", (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"{where}: unsupported image processor size {size}")
    crop = bool(get("do_center_crop"))
    crop_size = _set_fields(get("crop_size"))
    out: int | tuple[int, int] = (int(crop_size["height"]), int(crop_size["width"])) if crop else resize_size
    if get("do_rescale") is False or not math.isclose(float(get("rescale_factor") or 1 / 255), 1 / 255):
        raise ConfigError(f"{where}: only a 1/255 rescale is supported, got do_rescale={get('do_rescale')}, "
                          f"rescale_factor={get('rescale_factor')}")
    mean, std = get("image_mean"), get("image_std")
    if get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = get("resample")
    interpolation = PIL_CODES.get(int(resample), "bicubic") if resample is not None else "bilinear"
    backend = "pil" if type(processor).__name__.endswith("Pil") else "tensor"
    return PixelSpec(size=out, mean=_triple(mean), std=_triple(std), resize=resize, resize_size=resize_size,
                     crop=crop, interpolation=interpolation, backend=backend, floor_crop=backend == "pil")


def _set_fields(value: Any) -> dict[str, Any]:
    """The set entries of a processor's size (a dict, or transformers 5's `SizeDict`)."""
    if not value:
        return {}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {k: v for k, v in items if v is not None}


def _triple(v: Any) -> tuple[float, float, float]:
    values = [float(x) for x in (v if isinstance(v, list | tuple) else [v] * 3)]
    return (values[0], values[1], values[2])


def from_timm(config: dict[str, Any]) -> PixelSpec:
    """The `PixelSpec` of timm's eval transform for a data config
    (`timm.data.resolve_data_config`): `input_size`, `interpolation`, `crop_pct`,
    `crop_mode` (center, squash, border), `mean`, `std`."""
    size = pair(tuple(config["input_size"][-2:]))
    crop_pct = float(config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    scale = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
    mode = config.get("crop_mode") or "center"
    interpolation = config.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:  # timm's `random` is bilinear at eval time
        interpolation = "bilinear"
    mean, std = _triple(config["mean"]), _triple(config["std"])
    out = size[0] if size[0] == size[1] else size
    if mode == "squash":
        return PixelSpec(size=out, mean=mean, std=std, resize="squash", resize_size=scale, interpolation=interpolation)
    if mode == "border":
        fill = tuple(round(255 * v) for v in mean)
        return PixelSpec(size=out, mean=mean, std=std, resize="longest", resize_size=scale,
                         interpolation=interpolation, fill=(fill[0], fill[1], fill[2]))
    if mode != "center":
        raise ConfigError(f"timm crop_mode {mode!r} is not supported (center, squash, border)")
    target = scale[0] if scale[0] == scale[1] else scale
    return PixelSpec(size=out, mean=mean, std=std, resize="shortest", resize_size=target, interpolation=interpolation)
