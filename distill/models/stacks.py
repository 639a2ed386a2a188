"""The layer stacks of timm and Hugging Face towers (`distill.models.intermediate`).

- **timm** (`TimmStack`): the levels of the tower's `feature_info`, the same indices as
  `forward_intermediates`: a ViT's blocks, a CNN's stages (ResNet: stem, layer1..layer4). A
  block with timm's standard `Attention` gives `attention` (read at `attn_drop`, before
  dropout, with `fused_attn` off for that pass: timm's own unfused arithmetic) and `values`
  (the v third of `qkv`). A CNN stage has neither.
- **Hugging Face** (`HFStack`): the encoder's layer list; layer i is `hidden_states[i + 1]`
  of `output_hidden_states`. `attention` is what the layer's attention module returns as its
  weights under the eager implementation (`output_attentions`), switched on for that pass
  (SDPA returns none), with that module's attention dropout off for the pass so that a
  training student's rows stay distributions; `values` is the output of its value projection
  (`value`, `v_proj`, `v_lin`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from distill.models.inherit import find_layer_stack
from distill.models.intermediate import LayerStack, Tap, Unavailable, attribute, first, grid

VALUE_NAMES = ("value", "v_proj", "v_lin")
HEAD_NAMES = ("num_attention_heads", "num_heads", "n_heads")


def heads_of(attn: nn.Module) -> int | None:
    """An attention module's head count, from the attribute its library names it by."""
    for name in HEAD_NAMES:
        value = getattr(attn, name, None)
        if isinstance(value, int):
            return value
    config = getattr(attn, "config", None)
    return getattr(config, "num_attention_heads", None)


class TimmStack(LayerStack):
    """A timm tower's `feature_info` levels (see the module docstring)."""

    def __init__(self, tower: nn.Module) -> None:
        modules = dict(tower.named_modules())
        self.names = [str(f["module"]) for f in tower.feature_info]
        self.levels = [modules[n] for n in self.names]
        self.count = len(self.levels)
        self.prefix = int(getattr(tower, "num_prefix_tokens", 0) or 0)
        self.kind = type(tower).__name__

    def tap(self, kind: str, index: int) -> Tap:
        i = self.layer(index)
        level, prefix = self.levels[i], self.prefix
        if kind == "hidden":
            return Tap(level, lambda a, kw, o: grid(first(o)))
        if kind == "tokens":
            return Tap(level, lambda a, kw, o: first(o)[:, prefix:] if first(o).dim() == 3 else grid(first(o)))
        attn = getattr(level, "attn", None)
        standard = (isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "fused_attn")
                    and isinstance(getattr(attn, "attn_drop", None), nn.Module) and hasattr(attn, "head_dim"))
        if not standard:
            what = (f"{type(attn).__name__}, not timm's standard Attention" if attn is not None
                    else "a stage without attention (a CNN)")
            raise Unavailable(f"timm {self.kind} level {i} ({self.names[i]}) is {what}: it has no {kind}")
        assert attn is not None
        heads, width = int(attn.num_heads), int(attn.num_heads * attn.head_dim)
        if kind == "attention":
            return Tap(attn.attn_drop, lambda a, kw, o: a[0], mode=lambda: attribute(attn, "fused_attn", False),
                       mode_key=("timm-unfused", id(attn)), heads=heads)
        if kind == "values":
            return Tap(attn.qkv, lambda a, kw, o: o.unflatten(-1, (3, width))[..., 2, :], heads=heads)
        raise Unavailable(f"no {kind} outputs")


def attention_of(block: nn.Module) -> tuple[nn.Module, nn.Linear] | tuple[None, None]:
    """A Hugging Face layer's self-attention module (the one owning the value projection) and
    that projection."""
    for _, module in block.named_modules():
        for name in VALUE_NAMES:
            value = getattr(module, name, None)
            if isinstance(value, nn.Linear) and "cross" not in type(module).__name__.lower():
                return module, value
    return None, None


@contextmanager
def eager_attention(root: Any, attn: nn.Module) -> Iterator[None]:
    """`root` on the eager attention implementation (its weights are returned) and `attn`'s
    attention dropout off, for one forward pass."""
    before = getattr(root.config, "_attn_implementation", None)
    if before != "eager":
        root.set_attn_implementation("eager")
    try:
        with attribute(attn, "training", False):
            yield
    finally:
        if before is not None and before != "eager":
            root.set_attn_implementation(before)


class HFStack(LayerStack):
    """A Hugging Face encoder's layer list (see the module docstring).

    Args:
        tower: The module holding the layer list (a `BertModel`, `CLIPModel.text_model`).
        root: The `PreTrainedModel` whose attention implementation a read of attention switches.
        count: Its number of layers (`num_hidden_layers`).
        text: Whether it reads captions.
        prefix: Vision: tokens before the patches (CLIP's class token).
        sequence: `LayerSpec.sequence` of its positions.
        max_positions: Text: the most positions a caption takes.
    """

    def __init__(self, tower: nn.Module, root: Any, count: int, *, text: bool, prefix: int = 0,
                 sequence: str | None = None, max_positions: int | None = None) -> None:
        _, self.blocks = find_layer_stack(tower, count)
        self.root, self.count, self.text, self.prefix = root, count, text, prefix
        self.sequence, self.max_positions = sequence, max_positions

    def tap(self, kind: str, index: int) -> Tap:
        block, prefix = self.blocks[self.layer(index)], self.prefix
        if kind == "hidden":
            return Tap(block, lambda a, kw, o: first(o))
        if kind == "tokens" and not self.text:
            return Tap(block, lambda a, kw, o: first(o)[:, prefix:])
        attn, value = attention_of(block)
        heads = heads_of(attn) if attn is not None else None
        if attn is None or value is None or heads is None:
            raise Unavailable(f"{type(block).__name__} has no self-attention with a value projection "
                              f"({', '.join(VALUE_NAMES)}) and a head count")
        if kind == "attention":
            return Tap(attn, lambda a, kw, o: o[1], mode=lambda: eager_attention(self.root, attn),
                       mode_key=("hf-eager", id(attn)), heads=heads)
        if kind == "values":
            return Tap(value, lambda a, kw, o: o, heads=heads)
        raise Unavailable(f"no {kind} outputs")


__all__ = ["HFStack", "TimmStack", "attention_of", "eager_attention", "heads_of"]
