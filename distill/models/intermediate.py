"""Layer nodes: what a model computes between its input and its final embedding.

A layer node is named `<model>.<output>.<kind>[<layer>]` (`student.text.hidden[2]`,
`teacher.image.tokens[-1]`, `teacher.text.attention[11]`); layers count from 0, negative
indices from the last. The kinds:

| kind | value (a `Tokens`) | where |
|---|---|---|
| `hidden` | the output of layer i, every position: (N, L, D), text padding masked out | every stack of layers |
| `tokens` | the positions of the image grid only: (N, P, D) (ViT patches without class or register tokens; a CNN stage's H x W positions) | image towers |
| `attention` | attention probabilities of layer i: (N, H, L, L), each row a distribution over keys | attention layers |
| `values` | the value vectors of layer i's attention: (N, L, H x d), `heads` = H | attention layers |

They are read by forward hooks that `record` registers for the one forward pass that also
computes the model's final embedding, and only for the layers an enabled edge reads; a model
no edge reads at a layer runs with no hook at all. Where a fused kernel hides the attention
probabilities, the layer's attention runs unfused for that pass only (the library's own
eager path, the same arithmetic). Which kinds a model offers, how many layers and the shape
of each are found by `probe` on a skeleton of the model on the meta device (no weights, no
arithmetic), so that `distill validate` checks node names, layer indices and widths before
any weights load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from distill.errors import ConfigError

KINDS = ("hidden", "tokens", "attention", "values")
NODE = re.compile(r"^(?P<model>[^.\[\]]+)\.(?P<output>[^.\[\]]+)\.(?P<kind>[^.\[\]]+)(?:\[(?P<index>-?\d+)\])?$")


class LayerNode(NamedTuple):
    """A parsed layer-node name; `index` None for a name a layer map (`layers:`) indexes."""

    model: str
    output: str
    kind: str
    index: int | None

    @property
    def base(self) -> str:
        """The name without its layer index: `student.text.hidden`."""
        return f"{self.model}.{self.output}.{self.kind}"

    def at(self, index: int) -> str:
        """The name of this node at layer `index`."""
        return f"{self.base}[{index}]"


def parse_node(name: str) -> LayerNode | None:
    """`"student.text.hidden[2]"` -> LayerNode; None for an embedding node (`student.text`)
    or a name that is no layer node."""
    m = NODE.match(name)
    if m is None:
        return None
    index = m["index"]
    return LayerNode(m["model"], m["output"], m["kind"], None if index is None else int(index))


@dataclass(frozen=True)
class LayerShape:
    """One layer's output: its width (attention: the positions L), heads (attention and
    values) and positions (text: the most, `max_length`)."""

    width: int
    heads: int | None = None
    positions: int | None = None


@dataclass(frozen=True)
class LayerSpec:
    """What one kind of layer output of one model output offers (`Encoder.layer_outputs`).

    Attributes:
        kind: One of `KINDS`.
        shapes: One per layer, in order.
        sequence: Identity of the positions: two nodes with the same one see the same
            positions (text: the tokenizer's vocabulary, max length and prefix tokens;
            images: the grid). None: unknown, compared at run time.
        dynamic: Text: the length is the batch's longest caption, `positions` its maximum.
        reason: Why this kind is not available (then `shapes` is empty).
    """

    kind: str
    shapes: tuple[LayerShape, ...] = ()
    sequence: str | None = None
    dynamic: bool = False
    reason: str | None = None

    @property
    def count(self) -> int:
        return len(self.shapes)


@dataclass(frozen=True)
class LayerRead:
    """What the config check knows of one layer node an edge reads (handed to a token loss's
    `layer_problem`): its name, output (`image` / `text`), kind, layer, shape and sequence."""

    name: str
    output: str
    kind: str
    index: int
    shape: LayerShape
    sequence: str | None = None
    dynamic: bool = False


@dataclass
class Tokens:
    """The value of a layer node: per-position states and the mask of real positions.

    Attributes:
        states: (N, L, D) hidden states, patch tokens or values; (N, H, L, L) attention.
        mask: (N, L) bool, True at real positions (False at text padding).
        heads: Attention heads (attention and values), else None.
    """

    states: Tensor
    mask: Tensor
    heads: int | None = None

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def float(self) -> Tokens:
        """States in float32 (a half-precision teacher's)."""
        return replace(self, states=self.states.float())


class Unavailable(Exception):
    """A model cannot give this kind at this layer; the message says why (one line)."""


@dataclass(frozen=True)
class Tap:
    """How one layer node is read in a forward pass.

    Attributes:
        module: The module whose forward call holds the value.
        read: (call args, call kwargs, call output) -> the node's tensor.
        prepare: A forward pre-hook rewriting the call (args, kwargs), e.g. asking
            `nn.MultiheadAttention` for its weights.
        mode: A context the whole forward runs in (e.g. unfused attention); taps with the
            same `mode_key` enter it once.
        heads: Attention heads of the value (attention, values).
    """

    module: nn.Module
    read: Callable[[tuple, dict, Any], Tensor]
    prepare: Callable[[tuple, dict], tuple[tuple, dict]] | None = None
    mode: Callable[[], AbstractContextManager] | None = None
    mode_key: Any = None
    heads: int | None = None


def first(out: Any) -> Tensor:
    """A module's main output (the first of a tuple)."""
    return out[0] if isinstance(out, tuple | list) else out


@contextmanager
def attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.<name> = value` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def record(taps: Mapping[Any, Tap]) -> Iterator[dict[Any, Tensor]]:
    """Hooks for `taps` during the block; the dict fills with each tap's tensor as the
    forward pass reaches it. Nothing is registered for an empty mapping."""
    got: dict[Any, Tensor] = {}
    with ExitStack() as stack:
        modes: set[Any] = set()
        for tap in taps.values():
            if tap.mode is not None and tap.mode_key not in modes:
                modes.add(tap.mode_key)
                stack.enter_context(tap.mode())
        for key, tap in taps.items():
            if tap.prepare is not None:
                def before(module: nn.Module, args: tuple, kwargs: dict, tap: Tap = tap) -> tuple[tuple, dict]:
                    assert tap.prepare is not None
                    return tap.prepare(args, kwargs)

                stack.callback(tap.module.register_forward_pre_hook(before, with_kwargs=True).remove)

            def after(module: nn.Module, args: tuple, kwargs: dict, out: Any, key: Any = key, tap: Tap = tap) -> None:
                got[key] = tap.read(args, kwargs, out)

            stack.callback(tap.module.register_forward_hook(after, with_kwargs=True).remove)
        yield got
    missing = [k for k in taps if k not in got]
    if missing:
        raise RuntimeError(f"layer outputs {missing} were not computed by the forward pass (a layer that did not run)")


class LayerStack:
    """The layers behind one output of a model (`Encoder.layer_stack`).

    Subclasses give `count`, `tap(kind, index)` and, for images, `prefix` (class and register
    tokens before the grid); `tokens` turns a tapped tensor into the node's `Tokens`.

    Attributes:
        text: The stack reads captions (masks come from `attention_mask`).
        prefix: Tokens before the positions of the input (images: class/register tokens;
            a fused model's text: its [CLS]).
        sequence: `LayerSpec.sequence` of this stack's positions.
        max_positions: Text: the most positions a caption takes (its `max_length` and prefix).
    """

    count: int = 0
    text: bool = False
    prefix: int = 0
    sequence: str | None = None
    max_positions: int | None = None

    def tap(self, kind: str, index: int) -> Tap:
        """The tap of node `<kind>[index]`.

        Raises:
            Unavailable: This stack has no such kind (the message says why).
        """
        raise Unavailable(f"no {kind} outputs")

    def layer(self, index: int) -> int:
        """`index` in 0..count-1 (negative counts from the last)."""
        if not -self.count <= index < self.count:
            raise IndexError(f"layer {index} of a stack of {self.count}")
        return index % self.count

    def mask(self, inputs: Mapping[str, Tensor], length: int, device: torch.device) -> Tensor:
        """(N, length) bool of real positions: text padding is False; the prefix is real."""
        n = next(iter(inputs.values())).shape[0]
        if self.text and "attention_mask" in inputs:
            m = inputs["attention_mask"].bool().to(device)
            pad = length - m.shape[1]
            if pad >= 0:
                return torch.cat([torch.ones(n, pad, dtype=torch.bool, device=device), m], 1)
        return torch.ones(n, length, dtype=torch.bool, device=device)

    def tokens(self, kind: str, value: Tensor, inputs: Mapping[str, Tensor], heads: int | None) -> Tokens:
        """The `Tokens` of a tapped tensor (N, L, D) or, for attention, (N, H, L, L)."""
        length = value.shape[-1] if kind == "attention" else value.shape[1]
        if kind == "tokens":
            return Tokens(value, torch.ones(value.shape[:2], dtype=torch.bool, device=value.device), None)
        return Tokens(value, self.mask(inputs, length, value.device), heads)


def grid(x: Tensor) -> Tensor:
    """A CNN feature map (N, C, H, W) as (N, H x W, C) tokens; (N, L, D) unchanged."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def probe(stacks: Mapping[str, tuple[LayerStack, Callable[[], Any]]]) -> dict[str, dict[str, LayerSpec]]:
    """Output -> kind -> `LayerSpec`, from one meta-device forward per output with every tap.

    Args:
        stacks: Output -> (its stack, built on the meta device and in eval mode; a function
            running the output's forward pass on meta inputs of two rows).

    Raises:
        ConfigError: The forward pass fails (e.g. an image size the tower cannot take).
    """
    specs: dict[str, dict[str, LayerSpec]] = {}
    for output, (stack, run) in stacks.items():
        taps: dict[tuple[str, int], Tap] = {}
        reasons: dict[str, str] = {}
        for kind in KINDS:
            if kind == "tokens" and stack.text:
                reasons[kind] = "text has no patch tokens (use hidden)"
                continue
            try:
                taps.update({(kind, i): stack.tap(kind, i) for i in range(stack.count)})
            except Unavailable as e:
                reasons[kind] = str(e)
        try:
            with torch.device("meta"), record(taps) as got:
                run()
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # the library's own complaint
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"the {output} tower's forward pass fails on a meta-device probe: {reason}") from e
        specs[output] = {}
        for kind in KINDS:
            if kind in reasons:
                specs[output][kind] = LayerSpec(kind, reason=reasons[kind])
                continue
            shapes = []
            for i in range(stack.count):
                t = got[(kind, i)]
                positions = int(t.shape[-1] if kind == "attention" else t.shape[1])
                positions = stack.max_positions if stack.text else positions
                heads = int(t.shape[1]) if kind == "attention" else taps[(kind, i)].heads
                width = positions if kind == "attention" and positions is not None else int(t.shape[-1])
                shapes.append(LayerShape(width, heads, positions))
            specs[output][kind] = LayerSpec(kind, tuple(shapes), stack.sequence, stack.text)
    return specs


__all__ = ["KINDS", "LayerNode", "LayerRead", "LayerShape", "LayerSpec", "LayerStack", "Tap", "Tokens", "Unavailable",
           "attribute", "first", "grid", "parse_node", "probe", "record"]
