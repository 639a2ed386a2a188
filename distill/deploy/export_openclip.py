"""`distill export --format open_clip`: a folder that open_clip loads with its own functions.

```
DIR/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": {size, mean, std, interpolation, resize_mode, fill_color}}
DIR/open_clip_model.safetensors  the weights, by open_clip's state-dict names
DIR/tokenizer.json, ...          the Hugging Face tokenizer (absent for open_clip's own BPE tokenizer)
DIR/hf_text/config.json          the transformers config of a Hugging Face text tower, if any
```

`open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")`
load it offline, without `distill`. A Hugging Face text tower is built by open_clip from
`text_cfg.hf_model_name`, which `AutoConfig.from_pretrained` resolves from the working
directory, not from the folder: it names `DIR/hf_text` by its absolute path (edit it if
the folder moves).

A `dual_encoder` / `towers` student maps onto open_clip's `CustomTextCLIP`: the timm image
tower becomes `visual.trunk` (`timm_pool: ""` keeps the tower's own global pooling, as our
`num_classes=0` tower does) and `image_proj` the biased `visual.head.proj`; the transformers
text tower becomes `text.transformer` with open_clip's mean or CLS pooler and its bias-free
`text.proj`. Our `text_proj` bias b is folded into the text tower: the pooled vector p (a
mean or the first of the last hidden states, each the output gamma * n + beta of the
tower's last LayerNorm) moves to p + d when d is added to beta, and W (p + d) = W p + b for
d = pinv(W) b, exactly when b lies in W's column space (W, embed x hidden, of full row rank).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.models.dual_encoder import DualEncoder
from distill.models.openclip import OpenClip, import_open_clip
from distill.pixels import PixelSpec, pair

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
HF_TEXT = "hf_text"
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
NO_ARCHITECTURE = {"pretrained_image", "pretrained_text", "pretrained_hf", "pretrained_image_path",
                   "pretrained_text_path", "cache_dir", "output_dict", "require_pretrained", "weights_only",
                   "load_weights", "device", "force_preprocess_cfg"}
"""`open_clip.create_model` arguments that leave the architecture as it is."""


def preprocess_cfg(spec: PixelSpec) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` for a `PixelSpec` (the inverse of `distill.models.openclip.pixels_of`).

    Raises:
        ConfigError: A spec open_clip's eval transform cannot reproduce.
    """
    why = "open_clip's eval transform cannot reproduce the student's image preprocessing"
    if spec.resize_size is not None and pair(spec.resize_size) != pair(spec.size):
        raise ConfigError(f"--format open_clip: {why}: it resizes to {spec.resize_size} before cropping to "
                          f"{spec.size} (a crop_pct); open_clip resizes to the output size")
    if spec.backend != "pil" or spec.floor_crop:
        raise ConfigError(f"--format open_clip: {why}: transformers' arithmetic (backend {spec.backend!r}, "
                          f"floor_crop {spec.floor_crop}); open_clip uses PIL with rounded crop offsets")
    if spec.interpolation not in ("bicubic", "bilinear"):
        raise ConfigError(f"--format open_clip: {why}: interpolation {spec.interpolation!r} (open_clip: bicubic, bilinear)")
    if spec.resize == "shortest" and (not spec.crop or (isinstance(spec.size, tuple) and spec.interpolation != "bicubic")):
        raise ConfigError(f"--format open_clip: {why}: a shortest-side resize without a bicubic centre crop")
    fill = spec.fill if isinstance(spec.fill, int) else spec.fill[0]
    if not isinstance(spec.fill, int) and len(set(spec.fill)) > 1:
        raise ConfigError(f"--format open_clip: {why}: padding colour {spec.fill} (open_clip: one grey level)")
    size = spec.size if isinstance(spec.size, int) else list(spec.size)
    return {"size": size, "mean": list(spec.mean), "std": list(spec.std), "interpolation": spec.interpolation,
            "resize_mode": spec.resize, "fill_color": int(fill)}


def final_layer_norm(tower: nn.Module, tokens: dict[str, Tensor]) -> str:
    """The name of the LayerNorm (with a bias) whose output is the tower's last hidden state.

    Found by running `tokens` through the tower and comparing each LayerNorm's output with
    `last_hidden_state`; a norm called more than once (shared) does not count.

    Raises:
        ConfigError: No such LayerNorm (an encoder ending in RMSNorm, a bias-free norm or a
            residual add): the projection's bias has nowhere to go.
    """
    outputs: dict[str, list[Tensor]] = {}
    norms = {n: m for n, m in tower.named_modules() if isinstance(m, nn.LayerNorm)}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.setdefault(n, []).append(out))
             for n, m in norms.items()]
    try:
        with torch.no_grad():
            hidden = tower(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    for name, outs in outputs.items():
        if len(outs) == 1 and outs[0].shape == hidden.shape and torch.equal(outs[0], hidden):
            if norms[name].bias is not None:
                return name
    raise ConfigError(
        f"--format open_clip: the text tower's ({type(tower).__name__}) last hidden state does not come out of a "
        "LayerNorm with a bias, so text_proj's bias cannot be folded into it (open_clip's text projection has none)"
    )


def fold_text_bias(tower: nn.Module, proj: nn.Linear, tokens: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The text tower's state dict with `proj.bias` moved into its last LayerNorm's bias.

    Args:
        tower: A transformers encoder (BERT-style: post-LN blocks).
        proj: Our text projection, W (embed x hidden) and b.
        tokens: Captions to find the last LayerNorm with (`final_layer_norm`).

    Returns:
        The state dict, and what was folded where (for `distill_export.json`).

    Raises:
        ConfigError: No LayerNorm to shift, or b is not W d for any d (W of rank < embed).
    """
    state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    if proj.bias is None or not torch.any(proj.bias):
        return state, {"text_bias": None}
    w, b = proj.weight.detach().double(), proj.bias.detach().double()
    d = torch.linalg.pinv(w) @ b
    residual = float((w @ d - b).abs().max())
    if not residual <= 1e-6 * max(1.0, float(b.abs().max())):
        rank = int(torch.linalg.matrix_rank(w))
        raise ConfigError(
            f"--format open_clip: text_proj ({w.shape[0]} x {w.shape[1]}, rank {rank}) cannot absorb its bias into "
            f"the text tower: no shift d of the pooled state gives W d = b (residual {residual:.3g}); "
            "open_clip's text projection has no bias"
        )
    name = final_layer_norm(tower, tokens)
    key = f"{name}.bias"
    state[key] = (state[key].double() + d).to(state[key].dtype)
    return state, {"text_bias": {"folded_into": f"text.transformer.{key}", "residual": residual}}


def _hf_text_cfg(config: Any, pad_token_id: int | None) -> Any:
    """A transformers config for open_clip's `hf_model_name` folder, padding as our tokenizer does."""
    config = copy.deepcopy(config)
    if pad_token_id is not None:
        config.pad_token_id = int(pad_token_id)  # open_clip's attention mask is input_ids != pad_token_id
    return config


def _from_dual(encoder: DualEncoder, tokens: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor], Any, dict[str, Any]]:
    """(model_cfg, weights, HF text config, notes) of a dual encoder; text_cfg paths are filled in later."""
    from open_clip.hf_configs import arch_dict  # open_clip: optional, imported for this format only

    tower, text = encoder.image_tower, encoder.text_tower
    arch = (getattr(tower, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ConfigError(f"--format open_clip: the image tower ({type(tower).__name__}) has no timm architecture name")
    if encoder.image_args:
        raise ConfigError(f"--format open_clip: open_clip builds timm towers by name only; image_args "
                          f"{encoder.image_args} cannot be passed (timm_model_name {arch!r})")
    if encoder.image_proj.in_features != tower.num_features:
        raise ConfigError(f"--format open_clip: the timm tower {arch!r} pools to {encoder.image_proj.in_features} "
                          f"features after its pre-logits head, open_clip projects its num_features ({tower.num_features})")
    model_type = text.config.model_type
    if model_type not in arch_dict:
        raise ConfigError(f"--format open_clip: open_clip's Hugging Face text tower supports {', '.join(arch_dict)}; "
                          f"this one is {model_type!r}")
    text_state, notes = fold_text_bias(text, encoder.text_proj, tokens)
    weights = {f"visual.trunk.{k}": v for k, v in tower.state_dict().items()}
    weights["visual.head.proj.weight"] = encoder.image_proj.weight
    weights["visual.head.proj.bias"] = encoder.image_proj.bias
    weights.update({f"text.transformer.{k}": v for k, v in text_state.items() if not k.startswith("pooler.")})
    weights["text.proj.weight"] = encoder.text_proj.weight
    weights["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # open_clip's init; the task loss holds ours
    cfg = {
        "embed_dim": encoder.embed_dim,
        "vision_cfg": {"timm_model_name": arch, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "timm_proj_bias": True, "image_size": encoder.pixels.size},
        "text_cfg": {"hf_model_name": None, "hf_tokenizer_name": None, "hf_model_pretrained": False,
                     "hf_pooler_type": POOLERS[encoder.pooling], "hf_proj_type": "linear",
                     "context_length": encoder.max_length, "vocab_size": len(encoder.tokenizer)},
    }
    return cfg, weights, _hf_text_cfg(text.config, encoder.tokenizer.pad_token_id), notes


def _from_open_clip(encoder: OpenClip, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor], Any, dict[str, Any]]:
    """(model_cfg, weights, HF text config or None, notes) of an open_clip model, as it was built."""
    open_clip = import_open_clip()
    cfg = copy.deepcopy(getattr(encoder, "model_cfg", None) or open_clip.get_model_config(encoder.name) or {})
    if not cfg.get("vision_cfg") or not cfg.get("text_cfg"):
        raise ConfigError(f"--format open_clip: no open_clip config for {encoder.name!r}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if args.get("image_size") is not None:  # create_model's force_* arguments, as the model was built
        vision["image_size"] = args["image_size"]
    text["context_length"] = encoder.tokens.max_length
    for key, value in (args.get("model_args") or {}).items():
        if key == "force_quick_gelu" and value:
            cfg["quick_gelu"] = True
        elif key == "force_custom_text" and value:
            cfg["custom_text"] = True
        elif key == "force_patch_dropout" and value is not None:
            vision["patch_dropout"] = value
        elif key == "jit" and value:
            raise ConfigError("--format open_clip: a jit-scripted open_clip model has no state dict to export")
        elif key not in NO_ARCHITECTURE:
            cfg[key] = copy.deepcopy(value)  # create_model's **model_kwargs replace config keys
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    weights = dict(encoder.model.state_dict())
    hf_config = None
    if text.get("hf_model_name"):
        text["hf_model_pretrained"] = False
        hf_config = copy.deepcopy(encoder.model.text.config)
    return cfg, weights, hf_config, {}


def _tokenizer(encoder: Any) -> tuple[Any, bool]:
    """(the Hugging Face tokenizer to save or None, whether text_cfg names one)."""
    if isinstance(encoder, DualEncoder):
        return encoder.tokenizer, True
    open_clip = import_open_clip()
    tok = encoder.tokens.tokenizer
    if isinstance(tok, open_clip.tokenizer.HFTokenizer):
        return tok.tokenizer, True
    if type(tok) is open_clip.tokenizer.SimpleTokenizer:
        return None, False
    raise ConfigError(f"--format open_clip: open_clip loads a folder's tokenizer as HFTokenizer or its own BPE "
                      f"SimpleTokenizer; this model's is {type(tok).__name__}")


@dataclass(frozen=True)
class FolderConfig:
    """`open_clip_config.json` before its text tower's and tokenizer's paths are filled in."""

    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    hf_text: bool
    hf_tokenizer: bool

    def write(self, folder: Path, root: Path) -> None:
        """Write `folder/open_clip_config.json` with the paths naming `root` (absolute)."""
        cfg = copy.deepcopy(self.model_cfg)
        text = cfg["text_cfg"]
        if self.hf_text:
            text["hf_model_name"] = str(root.resolve() / HF_TEXT)
        if self.hf_tokenizer:  # get_tokenizer("local-dir:...") reads the folder itself; the name is for others
            text["hf_tokenizer_name"] = str(root.resolve())
        else:
            text.pop("hf_tokenizer_name", None)
        config = {"model_cfg": cfg, "preprocess_cfg": self.preprocess_cfg}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


class OpenClipFolder:
    """An open_clip export loaded by open_clip alone: what the parity check compares."""

    def __init__(self, folder: Path) -> None:
        open_clip = import_open_clip()
        self.folder = folder
        self.manifest = {"image": {"file": WEIGHTS}, "text": {"file": WEIGHTS}}
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self.embed_dim = int(json.loads((folder / CONFIG).read_text())["model_cfg"]["embed_dim"])

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.embed_dim), dtype=np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return self._empty()
        with torch.no_grad():
            emb = self.model.encode_image(torch.stack([self.preprocess(im) for im in images]), normalize=True)
        return emb.float().numpy()

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        if not captions:
            return self._empty()
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(list(captions)), normalize=True).float().numpy()


def write_open_clip(
    encoder: Any, tmp: Path, output: Path, args: dict[str, Any], tokens: dict[str, Tensor]
) -> tuple[FolderConfig, dict[str, Any]]:
    """Write the open_clip folder into `tmp`, its paths naming `tmp` (for the parity check;
    `FolderConfig.write(tmp, output)` then points them at the final place).

    Args:
        encoder: An `OpenClip` or `DualEncoder` (`towers` included) student, fp32, eval.
        tmp: The temporary folder being filled.
        output: Where the folder will live.
        args: The model's arguments in the checkpoint's config.
        tokens: A few tokenised captions (to find the text tower's last LayerNorm).

    Returns:
        The config, and notes for `distill_export.json` (what was folded, which absolute
        paths the config names).
    """
    pre = preprocess_cfg(encoder.pixels)
    if isinstance(encoder, DualEncoder):
        cfg, weights, hf_config, notes = _from_dual(encoder, tokens)
    else:
        cfg, weights, hf_config, notes = _from_open_clip(encoder, args)
    hf_tokenizer, named = _tokenizer(encoder)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(str(tmp))
    if hf_config is not None:
        hf_config.save_pretrained(str(tmp / HF_TEXT))
    save_file({k: (v.float() if v.is_floating_point() else v).detach().contiguous().clone()
               for k, v in weights.items()}, str(tmp / WEIGHTS))  # clones: safetensors refuses shared storage
    config = FolderConfig(cfg, pre, hf_config is not None, named)
    config.write(tmp, tmp)
    paths = {"text_cfg.hf_model_name": str(output.resolve() / HF_TEXT)} if hf_config is not None else {}
    return config, {**notes, "absolute_paths": paths}
