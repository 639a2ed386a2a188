"""The single-stream (fused) teacher: image patches and text tokens in one transformer.

Its graph node `<name>.pair` is not a tensor but a `PairScorer` over the batch: losses ask
it to score chosen (image row, caption row) pairs, e.g. the positives and the top-k
candidates of a dual teacher (MCAD, Lei et al. 2024), because scoring all B² pairs with a
cross-encoder is too slow. The backbone is shared with the `twin` student (VLDeformer's
decomposition, Zhang et al. 2022), whose parameter names match so `init:` or `twin(path=...)`
copies it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.batch import ModelInputs
from distill.errors import ConfigError
from distill.io import atomic_folder
from distill.models._hf import load_tokenizer, vocabulary_signature
from distill.models.base import Encoder, ImagePreprocess, TextPreprocess, l2norm, masked_mean
from distill.models.intermediate import LayerSpec, LayerStack, Tap, Unavailable, attribute, probe
from distill.registry import MODELS

ARCH = {"width": 256, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "image_size": 64, "patch_size": 8, "max_length": 40}


class PairScorer:
    """Image-text matching over the rows of one batch, for chosen candidate pairs.

    Args:
        run: `(image_idx, text_idx) -> (logits (K,), features (K, D))` for one chunk.
        n_images: Image rows in the batch (valid `image_idx` are below it).
        n_texts: Caption rows in the batch.
        grad: Whether calls may build a graph; False for frozen models (always no_grad).
        chunk_size: Pairs per forward pass, to bound memory.
    """

    def __init__(
        self, run: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], *, n_images: int, n_texts: int,
        grad: bool, chunk_size: int = 256,
    ) -> None:
        self.run, self.n_images, self.n_texts = run, n_images, n_texts
        self.grad, self.chunk_size = grad, chunk_size
        self._keys = torch.zeros(0, dtype=torch.long)  # memo of a frozen scorer: pair key -> row
        self._logits: Tensor | None = None
        self._features: Tensor | None = None

    def _compute(self, image_idx: Tensor, text_idx: Tensor) -> tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            parts = [self.run(image_idx[s:s + self.chunk_size], text_idx[s:s + self.chunk_size])
                     for s in range(0, len(image_idx), self.chunk_size)]
        return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()

    def __call__(self, image_idx: Tensor, text_idx: Tensor) -> tuple[Tensor, Tensor]:
        """ITM logits (K,) and fused features (K, D) of the pairs (image_idx[k], text_idx[k]).

        A frozen scorer (`grad` false) runs each distinct pair once per batch and memoises
        it, so several losses reading one fused teacher share its forward passes.
        """
        image_idx, text_idx = image_idx.long().flatten().cpu(), text_idx.long().flatten().cpu()
        if image_idx.shape != text_idx.shape:
            raise ValueError(f"image_idx and text_idx differ in length: {len(image_idx)} vs {len(text_idx)}")
        if len(image_idx) == 0:
            return torch.zeros(0), torch.zeros(0, 0)
        if self.grad and torch.is_grad_enabled():
            return self._compute(image_idx, text_idx)
        keys = image_idx * self.n_texts + text_idx
        new = torch.unique(keys[~torch.isin(keys, self._keys)])
        if len(new):
            logits, features = self._compute(new // self.n_texts, new % self.n_texts)
            self._keys = torch.cat([self._keys, new])
            self._logits = logits if self._logits is None else torch.cat([self._logits, logits.to(self._logits.device)])
            self._features = features if self._features is None else torch.cat(
                [self._features, features.to(self._features.device)])
        order = torch.argsort(self._keys)
        rows = order[torch.searchsorted(self._keys[order], keys)]
        assert self._logits is not None and self._features is not None
        rows = rows.to(self._logits.device)
        return self._logits[rows], self._features[rows]

    def scores(self, image_idx: Tensor, text_idx: Tensor) -> Tensor:
        """(K,) ITM logits: log-odds that image row image_idx[k] matches caption row text_idx[k]."""
        return self(image_idx, text_idx)[0]

    def features(self, image_idx: Tensor, text_idx: Tensor) -> Tensor:
        """(K, D) fused features of the pairs."""
        return self(image_idx, text_idx)[1]

    def matrix(self) -> Tensor:
        """(n_images, n_texts) logits of every pair (evaluation and small batches only)."""
        i = torch.arange(self.n_images).repeat_interleave(self.n_texts)
        t = torch.arange(self.n_texts).repeat(self.n_images)
        return self.scores(i, t).view(self.n_images, self.n_texts)


class Block(nn.Module):
    """Pre-norm transformer block; separate q, k, v so widths can be sliced (TinyCLIP).

    With `explicit` set (while a layer node reads this block's attention) the probabilities
    are computed as softmax(q k^T / sqrt(d) + mask) and pass through `probs`, where the
    hook reads them; otherwise the fused kernel runs. The two agree to float precision.
    """

    explicit = False

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)
        self.probs = nn.Identity()  # no parameters: checkpoints are unchanged

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n, length, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(n, length, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.explicit:
            scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            att = self.probs(scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(att.transpose(1, 2).reshape(n, length, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FusionBackbone(nn.Module):
    """Embeds image patches and text tokens (position + modality embeddings) and runs one
    stack of blocks over `[CLS] + parts`, whatever the parts are (both, or one modality)."""

    def __init__(self, *, vocab: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 image_size: int, patch_size: int, max_length: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.image_pos = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2, width) * 0.02)
        self.token_embed = nn.Embedding(vocab, width)
        self.text_pos = nn.Parameter(torch.randn(1, max_length, width) * 0.02)
        self.modality = nn.Embedding(2, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for emb in (self.token_embed, self.modality):  # torch's N(0, 1) would drown the tokens
            nn.init.normal_(emb.weight, std=0.02)

    def embed_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) -> patch tokens (N, P, D) and an all-true mask (N, P)."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.image_pos + self.modality.weight[0]
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(N, L) ids and mask -> token states (N, L, D) and a bool mask."""
        length = input_ids.shape[1]
        x = self.token_embed(input_ids) + self.text_pos[:, :length] + self.modality.weight[1]
        return x, attention_mask.bool()

    def forward(self, *parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """`(tokens, mask)` parts -> final states (N, 1 + sum L, D) and mask; position 0 is CLS."""
        n = parts[0][0].shape[0]
        x = torch.cat([self.cls.expand(n, -1, -1).to(parts[0][0].dtype), *(p[0] for p in parts)], dim=1)
        mask = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=x.device), *(p[1] for p in parts)], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask

    def encode_alone(self, part: tuple[Tensor, Tensor]) -> Tensor:
        """One modality alone -> l2norm(tanh(mean over positions)) (VLDeformer's readout), (N, D)."""
        return l2norm(torch.tanh(masked_mean(*self(part))))


class FusionStack(LayerStack):
    """The blocks of a `FusionBackbone` run on one modality alone (`fusion` and `twin`'s
    `image` / `text` outputs): the sequence is [CLS] + patches or [CLS] + caption tokens."""

    def __init__(self, backbone: FusionBackbone, output: str, sequence: str | None = None) -> None:
        self.blocks = backbone.blocks
        self.count, self.text, self.prefix = len(self.blocks), output == "text", 1
        self.sequence = sequence if self.text else None
        self.max_positions = backbone.text_pos.shape[1] + 1 if self.text else None

    def tap(self, kind: str, index: int) -> Tap:
        block = self.blocks[self.layer(index)]
        if kind == "hidden":
            return Tap(block, lambda a, kw, o: o)
        if kind == "tokens" and not self.text:
            return Tap(block, lambda a, kw, o: o[:, 1:])
        if kind == "attention":
            return Tap(block.probs, lambda a, kw, o: o, mode=lambda: attribute(block, "explicit", True),
                       mode_key=("explicit", id(block)), heads=block.heads)
        if kind == "values":
            return Tap(block.v, lambda a, kw, o: o, heads=block.heads)
        raise Unavailable(f"no {kind} outputs")


def described_layers(kind: str, kinds: tuple[str, ...], path: str | None,
                     args: dict[str, Any]) -> dict[str, dict[str, LayerSpec]]:
    """`layer_outputs` of a model on the fused backbone (fusion, twin): its architecture from
    `path` or the args, checked, then `fusion_layers`."""
    args = {k: v for k, v in args.items() if k in ARCH or k == "tokenizer"}
    arch = architecture(kind, kinds, path, args)
    check_architecture(arch)
    return fusion_layers(arch, str(Path(path).expanduser() / "tokenizer") if path else args.get("tokenizer"))


def fusion_layers(arch: dict[str, Any], tokenizer: str | None) -> dict[str, dict[str, LayerSpec]]:
    """`layer_outputs` of a `fusion` or `twin` architecture: a meta-device backbone, probed."""
    with torch.device("meta"):
        backbone = FusionBackbone(vocab=8, **arch).eval()
    size, sequence = arch["image_size"], f"{vocabulary_signature(tokenizer)}|{arch['max_length']}|cls"

    def image() -> Tensor:
        return backbone.encode_alone(backbone.embed_image(torch.zeros(2, 3, size, size)))

    def text() -> Tensor:
        ids = torch.zeros(2, 8, dtype=torch.long)
        return backbone.encode_alone(backbone.embed_text(ids, torch.ones_like(ids)))

    return probe({"image": (FusionStack(backbone, "image"), image),
                  "text": (FusionStack(backbone, "text", sequence), text)})


def architecture(kind: str, kinds: tuple[str, ...], path: str | None, args: dict[str, Any]) -> dict[str, Any]:
    """The architecture settings of a `fusion`/`twin` model: from its folder when `path` is
    given (then no architecture argument may be), else the arguments over the defaults."""
    given = sorted(k for k in args if k in ARCH or k == "tokenizer")
    if path is None:
        return {**ARCH, **{k: args[k] for k in given if k in ARCH}}
    if given:
        raise ConfigError(f"path is given, so the architecture and tokenizer come from the folder; drop {', '.join(given)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{kind} folder {path!r} does not exist")
    meta = root / "fusion.json"
    if not meta.is_file():
        raise ConfigError(f"{path!r} is not a {' or '.join(kinds)} folder (no fusion.json; write one with save_pretrained)")
    settings = json.loads(meta.read_text())
    if settings.get("kind") not in kinds:
        raise ConfigError(f"{path!r} holds a {settings.get('kind')!r} model, not {' or '.join(kinds)}")
    return {k: settings[k] for k in ARCH}


def check_architecture(arch: dict[str, Any]) -> None:
    """Raise a one-line error for sizes that cannot build."""
    if arch["image_size"] % arch["patch_size"]:
        raise ConfigError(f"image_size {arch['image_size']} is not a multiple of patch_size {arch['patch_size']}")
    if arch["width"] % arch["heads"]:
        raise ConfigError(f"width {arch['width']} is not a multiple of heads {arch['heads']}")


def save_folder(model: nn.Module, tokenizer: Any, kind: str, arch: dict[str, Any], folder: str | Path) -> Path:
    """Write `fusion.json` (kind + architecture), `model.safetensors` and `tokenizer/`, atomically."""

    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "fusion.json").write_text(json.dumps({"kind": kind, **arch}, indent=2))
    return Path(folder)


@MODELS.register("fusion")
class Fusion(Encoder):
    """A small single-stream transformer with an image-text matching (ITM) head.

    `pair`: the sequence is `[CLS] + image patches + caption tokens`; the ITM logit is a
    linear head on the final CLS state, which is also the pair's fused feature.
    `image` / `text`: the same transformer on one modality alone, read out as the `twin`
    student does. They let the model align before it fuses (ALBEF, Li et al. 2021: a
    contrastive edge on them, and ITM negatives mined from their similarity), and make the
    fused teacher's pretraining self-contained and its evaluation a retrieval one.

    Args:
        path: A folder written by `save_pretrained`; its settings and tokenizer replace the
            architecture and `tokenizer` arguments (which must then be left out).
        width: Token width. depth: Blocks. heads: Attention heads. mlp_ratio: MLP width / width.
        image_size: Input resolution. patch_size: Square patch side.
        max_length: Maximum tokens per caption (the text position table).
        tokenizer: Hub id or folder; the bundled tokenizer by default.
        chunk_size: Pairs per forward pass when scoring.
    """

    outputs = ("pair", "image", "text")

    def __init__(
        self, *, path: str | None = None, width: int = 256, depth: int = 4, heads: int = 4,
        mlp_ratio: float = 4.0, image_size: int = 64, patch_size: int = 8, max_length: int = 40,
        tokenizer: str | None = None, chunk_size: int = 256,
    ) -> None:
        super().__init__()
        arch = dict(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, image_size=image_size,
                    patch_size=patch_size, max_length=max_length)
        given = {k: v for k, v in arch.items() if v != ARCH[k]} | ({"tokenizer": tokenizer} if tokenizer else {})
        self.arch = architecture("fusion", ("fusion",), path, given)
        check_architecture(self.arch)
        source = str(Path(path).expanduser() / "tokenizer") if path else tokenizer
        self.tokenizer = load_tokenizer(source)
        self.sequence = f"{vocabulary_signature(source)}|{self.arch['max_length']}|cls"
        self.chunk_size = chunk_size
        self.backbone = FusionBackbone(vocab=len(self.tokenizer), **self.arch)
        self.itm_head = nn.Linear(self.arch["width"], 1)
        if path:

            self.load_state_dict(load_file(str(Path(path).expanduser() / "model.safetensors")))

    @classmethod
    def describe(cls, *, path: str | None = None, **args: Any) -> dict[str, int]:
        arch = architecture("fusion", ("fusion",), path, args)
        check_architecture(arch)
        return {"pair": int(arch["width"]), "image": int(arch["width"]), "text": int(arch["width"])}

    @classmethod
    def layer_outputs(cls, *, path: str | None = None, **args: Any) -> dict[str, dict[str, LayerSpec]]:
        return described_layers("fusion", ("fusion",), path, args)

    def layer_stack(self, output: str) -> LayerStack:
        if output in ("image", "text"):
            return FusionStack(self.backbone, output, self.sequence)
        return super().layer_stack(output)

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(size=self.arch["image_size"])

    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(tokenizer=self.tokenizer, max_length=self.arch["max_length"])

    def pair_forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Row-aligned pairs -> ITM logits (K,) and fused features (K, D), the head's input."""
        b = self.backbone
        image = b.embed_image(pixel_values)
        hidden, _ = b(image, b.embed_text(input_ids, attention_mask))
        n = image[0].shape[1] + 1
        feature = hidden[:, 0] + hidden[:, 1:n].mean(1) * masked_mean(hidden[:, n:], attention_mask)
        return self.itm_head(feature).squeeze(-1), feature

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.backbone.encode_alone(self.backbone.embed_image(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone.encode_alone(self.backbone.embed_text(input_ids, attention_mask))

    def encode(self, output: str, inputs: ModelInputs) -> Tensor | PairScorer:  # type: ignore[override]
        if output != "pair":
            return super().encode(output, inputs)
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]

        def run(i: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            i, t = i.to(pixels.device), t.to(ids.device)
            return self.pair_forward(pixels[i], ids[t], mask[t])

        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return PairScorer(run, n_images=len(pixels), n_texts=len(ids), grad=grad, chunk_size=self.chunk_size)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a folder that `fusion` (and `twin`, for its backbone) loads with `path:`."""
        return save_folder(self, self.tokenizer, "fusion", self.arch, folder)


__all__ = ["ARCH", "Block", "Fusion", "FusionBackbone", "FusionStack", "PairScorer", "fusion_layers"]
