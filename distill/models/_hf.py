"""Loading Hugging Face pieces from a hub id or a local folder with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.pixels import from_hf_processor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TOKENIZER = str(ASSETS / "tokenizer")


def looks_local(name: str) -> bool:
    """A path (absolute, relative with a slash prefix, or existing) rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def check_source(name: str, what: str) -> None:
    """Raise a one-line error if a local folder is missing."""
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{what} folder {name!r} does not exist")


def load_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name)`, turning hub and folder failures into one-line errors."""
    check_source(name, what)
    path = str(Path(name).expanduser()) if looks_local(name) else name
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = "" if looks_local(name) else " (no download happens offline: use a local folder)"
        raise ConfigError(f"cannot load {what} {name!r}{offline}: {reason}") from e


def load_tokenizer(name: str | None) -> Any:
    """A tokenizer from a hub id or folder; the bundled word-level tokenizer by default."""
    from transformers import AutoTokenizer  # transformers: heavy, imported when a model loads

    return load_pretrained(AutoTokenizer, name or DEFAULT_TOKENIZER, "tokenizer")


def load_image_spec(name: str) -> Any:
    """The `PixelSpec` of a model's own image processor (resize mode, filter, crop, mean, std,
    and the library's arithmetic: `distill.pixels.from_hf_processor`)."""
    from transformers import AutoImageProcessor  # transformers: heavy, imported when a model loads

    processor = load_pretrained(AutoImageProcessor, name, "image processor")
    return from_hf_processor(processor, f"image processor of {name!r}")
