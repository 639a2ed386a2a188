"""Weight inheritance: a model starts from another model's tensors (TinyCLIP's manual inheritance).

A model config may carry `init:`, applied by `distill.core.build` once every model has loaded:

```yaml
models:
  student:
    type: dual_encoder
    args: {...}
    init:
      from: teacher                       # another model of this config
      tensors:                            # student prefix -> teacher prefix, tensor by tensor
        text_tower.embeddings: text_tower.embeddings
        text_proj: text_proj
      layers:                             # student layer stack -> teacher stack + which layers
        text_tower.encoder.layer: {from: text_tower.encoder.layer, pick: uniform}
      slice: true                         # copy the leading slice of wider teacher tensors
```

`pick` is `uniform` (evenly spaced, first and last layer included, as the last layer is
what the teacher's projection was trained on), `first`, `last`, or a list of teacher layer
indices, one per student layer. With `slice: true` a teacher tensor larger in some
dimensions gives its leading block `t[:n0, :n1, ...]` (Wu et al., TinyCLIP, ICCV 2023);
otherwise shapes must match. Problems name both tensors and are raised together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.config.schema import Config
from distill.errors import ConfigError

INIT_KEYS = ("from", "tensors", "layers", "slice")
PICKS = ("uniform", "first", "last")


def pick_layers(n_teacher: int, n_student: int, pick: str | list[int]) -> list[int]:
    """Teacher layer indices for each of `n_student` layers.

    Raises:
        ValueError: an unknown pick, a list of the wrong length or an index out of range.
    """
    if isinstance(pick, str):
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS} or a list of layer indices, got {pick!r}")
        if n_student > n_teacher:
            raise ValueError(f"cannot pick {n_student} layers from a stack of {n_teacher}")
        if pick == "first":
            return list(range(n_student))
        if pick == "last":
            return list(range(n_teacher - n_student, n_teacher))
        if n_student == 1:
            return [n_teacher - 1]
        return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]
    chosen = [int(i) for i in pick]
    if len(chosen) != n_student:
        raise ValueError(f"pick lists {len(chosen)} layers for a stack of {n_student}")
    bad = [i for i in chosen if not -n_teacher <= i < n_teacher]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a stack of {n_teacher}")
    return [i % n_teacher for i in chosen]


def find_layer_stack(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of `n_layers` transformer blocks (shortest path: `encoder.layer`,
    `encoder.layers`, `transformer.layer`, ...)."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not stacks:
        raise ConfigError(f"{type(model).__name__} has no layer list of {n_layers} blocks")
    return min(stacks, key=lambda nm: nm[0].count("."))


def keep_layers(model: nn.Module, layers: int | list[int]) -> list[int]:
    """Keep the first `layers` blocks (an int) or the listed ones of a Hugging Face encoder.

    The kept blocks keep their weights; `config.num_hidden_layers` is updated so that
    `save_pretrained` writes a folder that loads back as the smaller model. Returns the kept
    indices.
    """
    config = model.config
    n = int(config.num_hidden_layers)
    problem = text_layers_problem(layers, n)
    if problem:
        raise ConfigError(problem)
    keep = list(range(layers)) if isinstance(layers, int) else pick_layers(n, len(layers), list(layers))
    path, stack = find_layer_stack(model, n)
    kept = nn.ModuleList([stack[i] for i in keep])
    for i, block in enumerate(kept):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i  # cache slots of decoder-style layers follow the new order
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return keep


def text_layers_problem(layers: int | list[int] | None, n_layers: int) -> str | None:
    """A one-line problem with a `text_layers` argument for a model of `n_layers`, or None."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return None if 1 <= layers <= n_layers else f"text_layers={layers} but the text model has {n_layers} layers"
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if not layers or bad:
        return f"text_layers {list(layers)} must be a non-empty list of indices below {n_layers}"
    return None


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def copy_tensor(dst: Tensor, src: Tensor, *, allow_slice: bool, names: tuple[str, str]) -> str | None:
    """Copy `src` (or its leading slice) into `dst` in place; return a problem naming both."""
    a, b = names
    if dst.shape != src.shape:
        if not allow_slice:
            return (f"shape mismatch: {a} {_shape(dst)} vs {b} {_shape(src)} "
                    "(set slice: true to copy the leading block of a wider teacher tensor)")
        if dst.ndim != src.ndim or any(d > s for d, s in zip(dst.shape, src.shape)):
            return f"cannot slice {b} {_shape(src)} to {a} {_shape(dst)}: the source is smaller or of another rank"
        src = src[tuple(slice(0, d) for d in dst.shape)]
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))
    return None


def _under(keys: list[str], prefix: str) -> list[str]:
    return [k for k in keys if not prefix or k == prefix or k.startswith(prefix + ".")]


def _join(prefix: str, rest: str) -> str:
    return ".".join(p for p in (prefix, rest) if p)


def inherit(
    student: nn.Module,
    teacher: nn.Module,
    *,
    tensors: dict[str, str] | None = None,
    layers: dict[str, Any] | None = None,
    slice: bool = False,
    names: tuple[str, str] = ("student", "teacher"),
    where: str = "init",
) -> list[str]:
    """Copy teacher tensors into the student; return the student keys written.

    Args:
        student: The model written to.
        teacher: The model read from.
        tensors: Student prefix -> teacher prefix; every student tensor under the prefix
            takes the teacher tensor with the same remainder ("" means the whole model).
        layers: Student `nn.ModuleList` path -> teacher stack path, or
            `{from: <teacher stack>, pick: uniform | first | last | [indices]}`.
        slice: Copy the leading block of teacher tensors that are larger (TinyCLIP).
        names: How to name the two models in messages.
        where: YAML path prefix of messages.

    Raises:
        ConfigError: every missing tensor, shape mismatch or bad layer choice, one line each.
    """
    s_state, t_state = student.state_dict(keep_vars=True), teacher.state_dict(keep_vars=True)
    s_keys = list(s_state)
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    for s_prefix, t_prefix in (tensors or {}).items():
        found = _under(s_keys, s_prefix)
        if not found:
            problems.append(f"{where}.tensors.{s_prefix}: no {names[0]} tensor under {s_prefix!r}")
        pairs += [(k, _join(t_prefix, k[len(s_prefix):].lstrip("."))) for k in found]
    for s_stack, spec in (layers or {}).items():
        spec = {"from": spec} if isinstance(spec, str) else dict(spec)
        path = f"{where}.layers.{s_stack}"
        try:
            s_list, t_list = student.get_submodule(s_stack), teacher.get_submodule(str(spec.get("from", s_stack)))
        except AttributeError as e:
            problems.append(f"{path}: {e}")
            continue
        if not isinstance(s_list, nn.ModuleList) or not isinstance(t_list, nn.ModuleList):
            problems.append(f"{path}: both ends must be layer lists (nn.ModuleList)")
            continue
        try:
            chosen = pick_layers(len(t_list), len(s_list), spec.get("pick", "uniform"))
        except ValueError as e:
            problems.append(f"{path}.pick: {e}")
            continue
        t_stack = str(spec.get("from", s_stack))
        for i, j in enumerate(chosen):
            s_prefix = f"{s_stack}.{i}"
            pairs += [(k, f"{t_stack}.{j}{k[len(s_prefix):]}") for k in _under(s_keys, s_prefix)]
    written = []
    for s_key, t_key in pairs:
        a, b = f"{names[0]}.{s_key}", f"{names[1]}.{t_key}"
        if t_key not in t_state:
            problems.append(f"{where}: {b} does not exist (wanted for {a})")
            continue
        problem = copy_tensor(s_state[s_key], t_state[t_key], allow_slice=slice, names=(a, b))
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            written.append(s_key)
    if problems:
        raise ConfigError(problems)
    return written


def init_problems(config: Config) -> list[str]:
    """Structural problems of every `models.<name>.init`, found before any weights load."""
    problems = []
    for name, model in config.models.items():
        init, path = dict(model.init or {}), f"models.{name}.init"
        if not init:
            continue
        unknown = [k for k in init if k not in INIT_KEYS]
        problems += [f"{path}.{k}: unknown key (allowed: {', '.join(INIT_KEYS)})" for k in unknown]
        source = init.get("from")
        if source is None:
            problems.append(f"{path}.from: missing: name the model to copy weights from")
        elif source == name or source not in config.models:
            others = ", ".join(m for m in config.models if m != name)
            problems.append(f"{path}.from: {source!r} is not another model of this config (models: {others})")
        for key in ("tensors", "layers"):
            if not isinstance(init.get(key, {}), dict):
                problems.append(f"{path}.{key}: expected a mapping of student -> teacher names")
        for stack, spec in dict(init.get("layers") or {}).items():
            if not isinstance(spec, str | dict):
                problems.append(f"{path}.layers.{stack}: expected a teacher stack name or {{from, pick}}")
            elif isinstance(spec, dict) and set(spec) - {"from", "pick"}:
                problems.append(f"{path}.layers.{stack}: allowed keys are from, pick")
        if not isinstance(init.get("slice", False), bool):
            problems.append(f"{path}.slice: expected true or false")
        if not init.get("tensors") and not init.get("layers"):
            problems.append(f"{path}: copies nothing; give tensors: and/or layers:")
        chain = [name]
        while isinstance(source, str) and source in config.models and source not in chain:
            chain.append(source)
            source = dict(config.models[source].init or {}).get("from")
        if source == name and len(chain) > 1:
            problems.append(f"{path}.from: inheritance cycle {' -> '.join([*chain, name])}")
    return problems


def init_order(config: Config, names: list[str]) -> list[str]:
    """`names` plus every model they inherit from (transitively), sources first."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in order or name in seen:
            return
        source = dict(config.models[name].init or {}).get("from")
        if source in config.models:
            visit(source, (*seen, name))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def apply_init(config: Config, models: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Run every loaded model's `init:` (sources first); return model -> keys written."""
    written = {}
    for name in init_order(config, list(models)):
        init = dict(config.models[name].init or {})
        if not init or name not in models:
            continue
        source = init["from"]
        written[name] = inherit(
            models[name], models[source], tensors=dict(init.get("tensors") or {}),
            layers=dict(init.get("layers") or {}), slice=bool(init.get("slice", False)),
            names=(name, source), where=f"models.{name}.init",
        )
    return written


__all__ = ["apply_init", "find_layer_stack", "inherit", "init_order", "init_problems", "keep_layers", "pick_layers"]
