"""Training augmentation: one view geometry per sample, applied by every model at its own size.

A *view* of an image is a random resized crop (torchvision's `RandomResizedCrop` rule: an
area fraction drawn from `scale`, a log-uniform aspect ratio from `ratio`, ten tries, then
the centre crop clamped to the ratio range), optionally a horizontal flip and a colour
jitter. Its parameters are drawn from a seed of (`augment.seed`, image key, view index) and
the image's size alone, so a view is the same in every process, epoch and run, which is what
lets `distill cache` store the teacher's outputs of V views per image and training replay
any of them (`distill.training.cache`).

The same view is shown to every model of a training row: each crops the same region of the
original image and resizes it to its own resolution with its own normalisation
(`PixelSpec.view_array`), so a 224-pixel teacher and a 128-pixel student see one scene.
Which view a row uses is drawn per sample key and epoch (`pick_view`): with `views: V` one
of V fixed views (cacheable), with `views: null` a fresh view every epoch (the live teacher
only). Evaluation never augments.

Flips and colour jitter are off by default: captions name sides and colours ("a red circle
left of a blue square", the embedded benchmark's and real data's), which a flipped or
recoloured image contradicts.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from distill.errors import ConfigError

FRESH = 1 << 62
"""The view-index range of `views: null`: a new view every epoch, never repeated in practice."""


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation settings (`data.augment`): see the module docstring.

    Args:
        scale: (min, max) area fraction of the crop (open_clip trains with (0.9, 1.0),
            MobileCLIP with (0.08, 1.0)).
        ratio: (min, max) aspect ratio w / h of the crop.
        hflip: Flip horizontally with probability 0.5.
        color_jitter: Brightness, contrast and saturation factors drawn from [1 - s, 1 + s].
        hue: Hue shift drawn from [-hue, hue] (at most 0.5).
        views: V fixed views per image (cacheable), or None for a fresh view every epoch.
        seed: Seeds the view parameters (not the choice of view per epoch, which `data.seed` does).
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    color_jitter: float = 0.0
    hue: float = 0.0
    views: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, where: str = "data.augment") -> AugmentSpec | None:
        """The spec of a `data.augment` config, None when it is not enabled.

        Raises:
            ConfigError: One line per bad setting, naming it (`data.augment.scale`).
        """
        if not getattr(cfg, "enabled", False):
            return None
        problems = []
        ranges = {}
        for name, low in (("scale", 0.0), ("ratio", 0.0)):
            value = list(getattr(cfg, name))
            if len(value) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in value) \
                    or not low < value[0] <= value[1] or (name == "scale" and value[1] > 1):
                bound = "0 < min <= max <= 1" if name == "scale" else "0 < min <= max"
                problems.append(f"{where}.{name}: expected [min, max] with {bound}, got {value}")
            else:
                ranges[name] = (float(value[0]), float(value[1]))
        if not 0 <= cfg.color_jitter < 1:
            problems.append(f"{where}.color_jitter: expected a strength in [0, 1), got {cfg.color_jitter}")
        if not 0 <= cfg.hue <= 0.5:
            problems.append(f"{where}.hue: expected a shift in [0, 0.5], got {cfg.hue}")
        if cfg.views is not None and (isinstance(cfg.views, bool) or not isinstance(cfg.views, int) or cfg.views < 1):
            problems.append(f"{where}.views: expected a number of views >= 1, or null for a fresh view every "
                            f"epoch, got {cfg.views!r}")
        if problems:
            raise ConfigError(problems)
        return cls(scale=ranges["scale"], ratio=ranges["ratio"], hflip=bool(cfg.hflip),
                   color_jitter=float(cfg.color_jitter), hue=float(cfg.hue), views=cfg.views, seed=int(cfg.seed))

    def key(self) -> dict[str, Any]:
        """What the views depend on (the cache fingerprint's `augment` part, and `meta.json`'s)."""
        return {"scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip,
                "color_jitter": self.color_jitter, "hue": self.hue, "views": self.views, "seed": self.seed}


@dataclass(frozen=True)
class View:
    """One view's parameters: the crop box in the original image's pixels, then the flip and
    the colour factors (applied in this order: brightness, contrast, saturation, hue)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    def as_row(self) -> list[float]:
        """The 9 numbers that replay this view (a cache's `views` array row)."""
        return [self.top, self.left, self.height, self.width, float(self.flip), self.brightness,
                self.contrast, self.saturation, self.hue]

    @classmethod
    def from_row(cls, row: Any) -> View:
        r = [float(x) for x in row]
        return cls(int(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]), r[5], r[6], r[7], r[8])


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a digest of `parts` (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def crop_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) by `RandomResizedCrop.get_params`'s rule, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the whole image, clamped to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(spec: AugmentSpec, image_key: str, view: int, width: int, height: int) -> View:
    """View number `view` of the image `image_key` (of size `width` x `height`): a pure function."""
    rng = _rng(spec.seed, image_key, view)
    top, left, h, w = crop_box(rng, width, height, spec.scale, spec.ratio)
    flip = spec.hflip and rng.random() < 0.5
    s = spec.color_jitter
    factors = [rng.uniform(1 - s, 1 + s) if s else 1.0 for _ in range(3)]
    hue = rng.uniform(-spec.hue, spec.hue) if spec.hue else 0.0
    return View(top, left, h, w, flip, *factors, hue)


def pick_view(spec: AugmentSpec, data_seed: int, epoch: int, sample_key: str) -> int:
    """Which view sample `sample_key` uses in `epoch`: one of `spec.views`, or a fresh one."""
    n = spec.views or FRESH
    return _rng("pick", data_seed, epoch, sample_key).randrange(n)


def apply_view(image: Image.Image, view: View, size: tuple[int, int], resample: int) -> Image.Image:
    """The view of `image` resized to `size` = (height, width): crop, resize, flip, colour."""
    from torchvision.transforms import functional as F  # torchvision: the colour operations

    box = (view.left, view.top, view.left + view.width, view.top + view.height)
    out = image.convert("RGB").resize((size[1], size[0]), resample, box=box)  # crop and resize in one pass
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if view.brightness != 1.0:
        out = F.adjust_brightness(out, view.brightness)
    if view.contrast != 1.0:
        out = F.adjust_contrast(out, view.contrast)
    if view.saturation != 1.0:
        out = F.adjust_saturation(out, view.saturation)
    if view.hue != 0.0:
        out = F.adjust_hue(out, view.hue)
    return out


def views_array(spec: AugmentSpec, image_key: str, width: int, height: int) -> np.ndarray:
    """(V, 9) float32: the parameters of every cached view of one image (`View.as_row`)."""
    return np.array([draw_view(spec, image_key, v, width, height).as_row() for v in range(spec.views or 0)],
                    dtype=np.float32)
