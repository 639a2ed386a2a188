"""`distill export`: one model of a checkpoint as a self-contained inference folder, or as a
folder in a standard format (`open_clip`, `hf`) that its own library loads without `distill`.

```
DIR/manifest.json       format, model, embed_dim, image {file, size, mean, std, resize, ...: distill.pixels.PixelSpec},
                        text {file, max_length, padding, quantized}, tokenizer, source, parity, weights
DIR/image.onnx, text.onnx   (image.pt, text.pt for TorchScript): graph and weights in one file
DIR/tokenizer/          the Hugging Face tokenizer (save_pretrained)
DIR/weights.safetensors only with `weights=True`: the PyTorch state_dict alone
```

ONNX goes through PyTorch's TorchScript-based exporter (`dynamo=False`: fast, no extra
dependency), opset 17, with a dynamic batch axis (and sequence axis for text). The folder is
written under a temporary name, checked for parity (`distill.deploy.parity`) and only then
renamed into place: a failed export leaves nothing that looks finished.

`--format open_clip` (`distill.deploy.export_openclip`: open_clip and dual-encoder students)
and `--format hf` (`distill.deploy.export_hf`: transformers students) write the library's own
folder plus `DIR/distill_export.json` (format, source, parity), which nothing needs to load
it; parity there is checked on the folder loaded back by that library.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_model
from torch import Tensor, nn

from distill.deploy.export_hf import HFFolder, write_hf
from distill.deploy.export_openclip import OpenClipFolder, write_open_clip
from distill.deploy.parity import (
    INT8_MIN_COSINE,
    MIN_COSINE,
    ParityError,
    check_parity,
    eval_items,
    parity_inputs,
    text_recall_cost,
)
from distill.deploy.runtime import MANIFEST, ExportedModel
from distill.errors import ConfigError
from distill.io import atomic_folder
from distill.models.base import Encoder
from distill.models.dual_encoder import DualEncoder
from distill.models.hf_clip import HFClip
from distill.models.openclip import OpenClip
from distill.training.checkpoint import load_checkpoint

FORMATS = {"onnx": ("image.onnx", "text.onnx"), "torchscript": ("image.pt", "text.pt")}
LIBRARY_FORMATS = {"open_clip": "open_clip", "hf": "transformers"}
"""Formats whose folder its own library (the value) loads: no manifest, no `distill` runtime."""
INFO = "distill_export.json"
QUANTIZATIONS = ("int8",)
OPSET = 17


class ImageGraph(nn.Module):
    """`encoder.encode_image` as a module's forward: what gets traced."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encoder.encode_image(pixel_values)


class TextGraph(nn.Module):
    """`encoder.encode_text` as a module's forward: what gets traced."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder.encode_text(input_ids, attention_mask)


def _choice(value: str | None, allowed: Any, what: str) -> None:
    if value is not None and value not in allowed:
        close = difflib.get_close_matches(value, list(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{what}: unknown value {value!r} (choose from {', '.join(allowed)}){hint}")


def pick_encoder(module: Any, model: str | None, source: str | Path) -> tuple[str, Encoder]:
    """The named model of a loaded checkpoint (default `eval.model`), if it is a dual encoder."""
    name = model or module.config.eval.model
    models = module.graph.models
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--model: {name!r} is not a model of {source} (models: {', '.join(models)}){hint}")
    encoder = models[name]
    cls = type(encoder)
    if (
        cls.encode_image is Encoder.encode_image
        or cls.encode_text is Encoder.encode_text
        or encoder.image_preprocess() is None
        or encoder.text_preprocess() is None
    ):
        raise ConfigError(f"--model: {name!r} ({cls.__name__}) has no separate image and text encoders to export")
    return name, encoder.float().eval()  # a frozen model may be stored in fp16/bf16


def _example_inputs(encoder: Encoder, images: list[Any], captions: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Two images and two captions of different lengths: the traced text graph sees padding."""
    image_pre, text_pre = encoder.image_preprocess(), encoder.text_preprocess()
    assert image_pre is not None and text_pre is not None
    pixels = torch.stack([image_pre(im) for im in (images * 2)[:2]])
    return pixels, text_pre([captions[0], " ".join(captions[:3])])


def write_towers(encoder: Encoder, folder: Path, fmt: str, pixels: Tensor, tokens: dict[str, Tensor]) -> None:
    """Trace both encoders into `folder` (ONNX or TorchScript)."""
    image_file, text_file = FORMATS[fmt]
    image, text = ImageGraph(encoder).eval(), TextGraph(encoder).eval()
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter; parity is the check
        if fmt == "torchscript":  # frozen: only the tensors each graph uses are saved
            torch.jit.freeze(torch.jit.trace(image, (pixels,), check_trace=False)).save(str(folder / image_file))
            torch.jit.freeze(torch.jit.trace(text, (ids, mask), check_trace=False)).save(str(folder / text_file))
            return
        batch = {0: "batch"}
        torch.onnx.export(
            image, (pixels,), str(folder / image_file), dynamo=False, opset_version=OPSET,
            input_names=["pixel_values"], output_names=["embedding"],
            dynamic_axes={"pixel_values": batch, "embedding": batch},
        )
        torch.onnx.export(
            text, (ids, mask), str(folder / text_file), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "embedding": batch},
        )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of an ONNX file (weights int8, activations quantised on the fly)."""
    from onnxruntime.quantization import (  # onnxruntime: heavy, only for int8 exports
        QuantType,
        quantize_dynamic,
    )

    logging.disable(logging.WARNING)  # "consider pre-processing" is advice printed on every call
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)


def formats_for(encoder: Encoder) -> tuple[str, ...]:
    """The export formats that apply to a model."""
    if isinstance(encoder, OpenClip | DualEncoder):
        return (*FORMATS, "open_clip")
    return (*FORMATS, "hf") if isinstance(encoder, HFClip) else tuple(FORMATS)


def _check_output(output: Path) -> None:
    """Refuse to replace a folder that is not an earlier export."""
    earlier = (output / MANIFEST).is_file() or (output / INFO).is_file()
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not earlier)):
        raise ConfigError(f"--output: {output} exists and is not an export folder; choose another path")


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def export_checkpoint(
    checkpoint: str | Path,
    *,
    format: str = "onnx",
    model: str | None = None,
    output: str | Path | None = None,
    quantize_text: str | None = None,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    weights: bool = False,
    parity_images: int = 32,
) -> Path:
    """Export one model of a `distill fit` checkpoint and check it against PyTorch.

    Args:
        checkpoint: A `.ckpt` written by `distill fit`.
        format: "onnx" or "torchscript"; "open_clip" (an open_clip or dual-encoder model) or
            "hf" (a transformers model) for a folder that library loads by itself.
        model: Which model of the checkpoint's config (default `eval.model`).
        output: The export folder (default `<checkpoint folder>/export-<model>-<format>`);
            an earlier export there is replaced.
        quantize_text: "int8" quantises the text encoder (ONNX only); its recall cost on the
            dataset's test split is measured and stored in the manifest.
        images: A folder of parity images (default: the test split of the checkpoint's dataset).
        captions: A file of parity captions, one a line (default: the same split's captions).
        weights: Also write the PyTorch state_dict as `weights.safetensors`.
        parity_images: How many images (and their captions) the parity check compares.

    Returns:
        The export folder.

    Raises:
        ConfigError: A missing checkpoint, unknown model, format or quantisation, a format
            that does not apply to the model.
        ParityError: The export's embeddings differ from PyTorch's (or, for open_clip and
            hf, that library cannot load the folder back).
    """
    _choice(format, (*FORMATS, *LIBRARY_FORMATS), "--format")
    _choice(quantize_text, QUANTIZATIONS, "--quantize-text")
    if quantize_text and format != "onnx":
        raise ConfigError(f"--quantize-text: quantisation needs --format onnx, got {format!r}")
    if weights and format in LIBRARY_FORMATS:
        raise ConfigError(f"--weights: a --format {format} folder holds the weights already; leave --weights out")
    module = load_checkpoint(checkpoint)
    name, encoder = pick_encoder(module, model, checkpoint)
    if format not in formats_for(encoder):
        spec = module.config.models[name]
        raise ConfigError(f"--format {format}: model {name!r} ({spec.type}, {type(encoder).__name__}) exports "
                          f"only as {', '.join(formats_for(encoder))}")
    output = Path(output) if output else Path(checkpoint).parent / f"export-{name}-{format}"
    _check_output(output)
    pics, texts = parity_inputs(module.config, images=images, captions=captions, n=parity_images)
    with atomic_folder(output) as tmp:  # an earlier export of the same path is replaced whole
        if format in LIBRARY_FORMATS:
            spec = module.config.models[name]
            info = _export_library(name, encoder, tmp, output, format, _plain(spec.args), pics, texts)
            info.update(source=str(Path(checkpoint).resolve()), type=spec.type)
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        else:
            manifest = _export(module.config, name, encoder, tmp, output, format, pics, texts, quantize_text, weights)
            manifest["source"] = str(Path(checkpoint).resolve())
            _write_manifest(tmp, manifest)
    return output


def _export(
    config: Any, name: str, encoder: Encoder, tmp: Path, output: Path, fmt: str, pics: list[Any],
    texts: list[str], quantize_text: str | None, weights: bool,
) -> dict[str, Any]:
    """Write the towers, tokenizer and manifest into `tmp`, check parity; return the manifest.

    Parity errors name the files by their final place, `output`.
    """
    image_pre, text_pre = encoder.image_preprocess(), encoder.text_preprocess()
    assert image_pre is not None and text_pre is not None
    pixels, tokens = _example_inputs(encoder, pics, texts)
    write_towers(encoder, tmp, fmt, pixels, tokens)
    text_pre.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    with torch.inference_mode():
        embed_dim = int(encoder.encode_image(pixels[:1]).shape[-1])
    image_file, text_file = FORMATS[fmt]
    manifest: dict[str, Any] = {
        "format": fmt,
        "model": name,
        "embed_dim": embed_dim,
        "image": {"file": image_file, **image_pre.to_dict()},
        "text": {"file": text_file, "max_length": text_pre.max_length, "padding": text_pre.padding, "quantized": None},
        "tokenizer": "tokenizer",
        "source": None,
        "parity": {},
        "weights": None,
    }
    _write_manifest(tmp, manifest)
    fp32 = ExportedModel(tmp)
    parity: dict[str, Any] = dict(check_parity(fp32, encoder, pics, texts, name=output))
    parity.update(min_cosine=MIN_COSINE, images=len(pics), captions=len(texts))
    if quantize_text:
        quantize_int8(tmp / text_file, tmp / f"text.{quantize_text}.onnx")
        os.replace(tmp / f"text.{quantize_text}.onnx", tmp / text_file)  # inside the atomic folder
        manifest["text"]["quantized"] = quantize_text
        _write_manifest(tmp, manifest)
        int8 = ExportedModel(tmp)
        worst = check_parity(int8, encoder, pics, texts, modalities=("text",), min_cosine=INT8_MIN_COSINE, name=output)
        split, items = eval_items(config)
        parity.update(text_fp32=parity["text"], text=worst["text"], text_min_cosine=INT8_MIN_COSINE)
        parity["int8_recall"] = {"split": split, **text_recall_cost(fp32, int8, items)}
    if weights:
        save_model(encoder, str(tmp / "weights.safetensors"))
        spec = config.models[name]
        manifest["weights"] = {"file": "weights.safetensors", "type": spec.type, "args": _plain(spec.args)}
    manifest["parity"] = parity
    return manifest


def _export_library(
    name: str, encoder: Encoder, tmp: Path, output: Path, fmt: str, args: dict[str, Any], pics: list[Any],
    texts: list[str],
) -> dict[str, Any]:
    """Write an open_clip or transformers folder into `tmp`, load it back with that library
    and check parity; return the `distill_export.json` content."""
    if fmt == "open_clip":
        _, tokens = _example_inputs(encoder, pics, texts)
        config, notes = write_open_clip(encoder, tmp, output, args, tokens)
        load: Any = OpenClipFolder
    else:
        notes = write_hf(encoder, tmp, args)  # type: ignore[arg-type] - formats_for checked the type
        load = partial(HFFolder, max_length=notes["max_length"], padding=notes["padding"])
    try:
        loaded = load(tmp)
    except (RuntimeError, ValueError, OSError, KeyError) as e:  # e.g. a strict load_state_dict mismatch
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParityError(f"{output}: {LIBRARY_FORMATS[fmt]} cannot load the exported folder back: {reason}") from e
    parity: dict[str, Any] = dict(check_parity(loaded, encoder, pics, texts, name=output))
    parity.update(min_cosine=MIN_COSINE, images=len(pics), captions=len(texts))
    if fmt == "open_clip":
        config.write(tmp, output)  # its paths now name the final place (parity read them in tmp)
    embed_dim = int(loaded.encode_texts(texts[:1]).shape[-1])
    return {"format": fmt, "model": name, "embed_dim": embed_dim, "parity": parity, **notes}


def _plain(args: Any) -> Any:
    """Model arguments as plain JSON values (omegaconf containers included)."""
    return OmegaConf.to_container(args) if OmegaConf.is_config(args) else json.loads(json.dumps(args or {}))


def summary(folder: str | Path) -> str:
    """What `distill export` prints: the folder, the parity measured and any int8 recall cost."""
    info = Path(folder) / INFO
    m = json.loads((info if info.is_file() else Path(folder) / MANIFEST).read_text())
    p = m["parity"]
    lines = [
        f"wrote {folder}: {m['format']}, model {m['model']!r}, {m['embed_dim']}-d embeddings",
        f"parity vs PyTorch over {p['images']} images / {p['captions']} captions: "
        f"worst cosine image {p['image']:.6f}, text {p['text']:.6f}",
    ]
    if m["format"] in LIBRARY_FORMATS:
        lines[-1] = lines[-1].replace("vs PyTorch", f"loaded back by {LIBRARY_FORMATS[m['format']]} vs PyTorch")
        for key, path in m.get("absolute_paths", {}).items():
            lines.append(f"{key} names {path} (edit it if the folder moves)")
    elif m["text"]["quantized"]:
        r = p["int8_recall"]
        lines[-1] += f" (int8 text, bound {p['text_min_cosine']}; fp32 text {p['text_fp32']:.6f})"
        lines.append(f"int8 text recall cost on the {r['split']} split ({r['images']} images, {r['captions']} captions):")
        keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]
        lines.append("  " + " ".join(f"{k:>8}" for k in ["text", *keys]))
        for variant in ("fp32", "int8"):
            lines.append("  " + " ".join([f"{variant:>8}", *(f"{r[variant][k]:8.2f}" for k in keys)]))
        lines.append(f"  RSUM drop {r['rsum_drop']:.2f}")
    return "\n".join(lines)
