"""Reading `distill fit` checkpoints back: the saved config and the graph with its weights.

Pure torch: the deploy commands (`search`, `serve`, `export`, `bench`) read checkpoints
through this module without importing Lightning.

A checkpoint is data, never code. It is unpickled with `weights_only=True` (tensors and
plain containers only), so a crafted pickle entry cannot run. Its stored config is
refused when it would run code once loaded: `plugins:` (imported modules) and `pipe:`
data URLs (shell commands), unless the user says they trust the file
(`distill --trust-checkpoint ...`, or `trust=True`) or evaluates with their own YAML.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from distill.config.load import apply_overrides, config_from_raw
from distill.config.schema import Config
from distill.core.build import build_graph
from distill.core.check import checked, load_checked
from distill.core.graph import KnowledgeGraph
from distill.errors import ConfigError
from distill.trust import TRUST

PREFIX = "graph."
"""State-dict keys of a `DistillModule` checkpoint start with the graph's attribute name."""


@dataclass
class Trained:
    """A trained run read back from a checkpoint: its config and its graph (eval mode)."""

    config: Config
    graph: KnowledgeGraph


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain containers only).

    Raises:
        ConfigError: If the file is missing, damaged or holds objects other than tensors
            and plain containers (which could run code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, ...: one line, cause kept
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: not a readable distill checkpoint: {first}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("hyper_parameters", {}).get("config"), dict):
        raise ConfigError(f"{path}: not a distill checkpoint (no hyper_parameters.config)")
    return ckpt


def load_tolerant(
    module: nn.Module, state: Mapping[str, Any], frozen: Iterable[str], *, strict: bool = True
) -> Any:
    """`module.load_state_dict(state)`, except that tensors under the `frozen` prefixes may be
    absent on either side: a teacher served by the output cache is not loaded, so a
    checkpoint of a cached run lacks it, and a cached run resumes from a live one.

    Raises:
        RuntimeError: Under `strict`, when any other tensor is missing or unexpected.
    """
    frozen = tuple(frozen)
    own = module.state_dict()
    kept = {k: v for k, v in state.items() if k in own or not k.startswith(frozen)}
    result = module.load_state_dict(kept, strict=False)
    bad = [k for k in (*result.missing_keys, *result.unexpected_keys) if not k.startswith(frozen)]
    if strict and bad:
        raise RuntimeError(f"state_dict mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return result


def frozen_prefixes(config: Config, prefix: str = "") -> list[str]:
    """State-dict prefixes of the config's frozen models (`<prefix>models.<name>.`)."""
    return [f"{prefix}models.{n}." for n, m in config.models.items() if m.frozen]


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def code_in_config(config: Config) -> list[str]:
    """What in a config runs code once it is loaded: plugin imports and `pipe:` data URLs."""
    found = [f"plugins[{i}]: imports {name!r}" for i, name in enumerate(config.plugins)]
    found += [f"{where}: {value!r} runs a shell command" for where, value in _strings(dict(config.data.args), "data.args")
              if value.strip().startswith("pipe:")]  # fmt: skip
    return found


def load_checkpoint(path: str | Path, overrides: list[str] | None = None, *, trust: bool = False) -> Trained:
    """The config saved in a `distill fit` checkpoint (plus `overrides`), checked, and its
    graph with the trained weights, in eval mode.

    Args:
        path: The `.ckpt` file.
        overrides: Dotted `key=value` overrides of the stored config.
        trust: Allow a stored config that imports plugins or reads `pipe:` URLs (both run
            code); default: refuse it, unless the CLI was given
            `--trust-checkpoint` (`distill.trust.TRUST`).

    Raises:
        ConfigError: A missing or unsafe file, a bad saved config or override, or weights
            that do not fit the config's models.
    """
    ckpt = read_checkpoint(path)
    raw = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    if overrides:
        raw = apply_overrides(raw, overrides)
    config = config_from_raw(raw)
    code = code_in_config(config)
    if code and not (trust or TRUST.checkpoints):
        raise ConfigError(
            f"{path}: its stored config would run code when loaded ({'; '.join(code)}); pass "
            "--trust-checkpoint if you trust this file, or use your own YAML"
        )
    config = checked(config)
    graph = build_graph(config)
    state = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    try:
        load_tolerant(graph, state, frozen_prefixes(config))
    except RuntimeError as e:
        raise ConfigError(f"{path}: its weights do not fit the models of its config: {str(e)[:300]}") from e
    return Trained(config, graph.eval())


def open_target(target: str | Path, overrides: list[str] | None = None, *, model: str | None = None) -> Trained:
    """A `.ckpt` written by `distill fit` (its models as trained), or an experiment YAML (its
    models as built, `model` among them).

    Raises:
        ConfigError: A bad file or config, or `model` not among the loaded models.
    """
    if str(target).endswith(".ckpt"):
        trained = load_checkpoint(target, overrides)
    else:
        config = load_checked(target, overrides)
        if model:
            config.eval.model = model  # make sure it loads
        trained = Trained(config, build_graph(config).eval())
    name = model or trained.config.eval.model
    if name not in trained.graph.models:
        raise ConfigError(f"--model: {name!r} is not a loaded model; loaded: {', '.join(trained.graph.models)}")
    return trained
