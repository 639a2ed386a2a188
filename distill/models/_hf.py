"""Loading Hugging Face pieces from a hub id or a local folder with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

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


def skeleton(config: Any) -> Any:
    """`AutoModel.from_config(config)` on the meta device: the architecture without weights
    or arithmetic, for probing its layers (`distill.models.intermediate.probe`)."""
    from transformers import AutoModel  # transformers: heavy, imported when a model loads

    with torch.device("meta"):
        return AutoModel.from_config(config).eval()


def load_image_spec(name: str) -> Any:
    """The `PixelSpec` of a model's own image processor (resize mode, filter, crop, mean, std,
    and the library's arithmetic: `distill.pixels.from_hf_processor`)."""
    from transformers import AutoImageProcessor  # transformers: heavy, imported when a model loads

    processor = load_pretrained(AutoImageProcessor, name, "image processor")
    return from_hf_processor(processor, f"image processor of {name!r}")


def vocabulary_signature(name: str | None) -> str:
    """Who tokenises alike: a hash of the vocabulary of a local tokenizer folder (token -> id,
    read from `tokenizer.json`, `vocab.txt` or `vocab.json`, so a folder written by
    `save_pretrained` in another format signs the same), else the hub id itself."""
    name = name or DEFAULT_TOKENIZER
    folder = Path(name).expanduser()
    if not (looks_local(name) and folder.is_dir()):
        return name
    vocab: dict[str, int] | None = None
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
        raw = model.get("vocab")
        if isinstance(raw, dict):
            vocab = {str(k): int(v) for k, v in raw.items()}
        elif isinstance(raw, list):  # unigram: [piece, score] pairs in id order
            vocab = {str(p[0]): i for i, p in enumerate(raw)}
    elif (folder / "vocab.txt").is_file():
        vocab = {t: i for i, t in enumerate((folder / "vocab.txt").read_text().splitlines())}
    elif (folder / "vocab.json").is_file():
        vocab = {str(k): int(v) for k, v in json.loads((folder / "vocab.json").read_text()).items()}
    if vocab is None:
        return str(folder.resolve())
    return "vocab:" + hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
