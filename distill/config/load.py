"""YAML loading: `extends:` chains, `key=value` overrides, the schema merge.

`load_config(path, overrides)` returns a schema-checked `Config` or raises one
`ConfigError` with every problem, one line each, starting with the dotted YAML path.
Loading never runs the semantic checks against the registries: the command decides
(`distill.core.check.load_checked` loads and checks, all problems together).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from distill.config.schema import Config
from distill.errors import ConfigError


def read_yaml(path: Path, where: str) -> DictConfig:
    """A YAML file whose top level is a mapping, or a one-line `ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such config file {str(path)!r}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, keep the cause
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        lines = path.read_text(errors="replace").splitlines()
        line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        if re.search(r"\[[^\]]*\w\[-?\d+\]", line):  # `[a.text.hidden[2], ...]`: brackets in a flow list
            what += "; a layer node such as student.text.hidden[2] inside a [...] list must be quoted, or listed one per line"
        raise ConfigError(f"{path}: not valid YAML{at}: {what}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_raw(path: str | Path, _seen: tuple[Path, ...] = (), _where: str = "config") -> DictConfig:
    """Read a YAML file and the files it `extends:` (relative to it), merged base-first."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"{path}: extends cycle {chain}")
    raw = read_yaml(path, _where)
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list):
        raise ConfigError(f"{path}: extends must be a file name or a list of them")
    merged = OmegaConf.create({})
    for i, base in enumerate(bases):
        merged = merge_raw(merged, load_raw(path.parent / str(base), (*_seen, path), f"{path}: extends[{i}]"))
    return merge_raw(merged, raw)


def merge_raw(base: DictConfig, child: DictConfig) -> DictConfig:
    """`child` merged over `base`; where the two disagree in shape (a list over a mapping),
    the child's value replaces the base's, for the schema check to report at its path."""
    try:
        return OmegaConf.merge(base, child)
    except (OmegaConfBaseException, TypeError, ValueError):
        out = base.copy()
        for key in child.keys():
            mine, theirs = child._get_node(key), out._get_node(key) if key in out else None
            if isinstance(mine, DictConfig) and isinstance(theirs, DictConfig):
                out[key] = merge_raw(theirs, mine)
            else:
                out[key] = mine
        return out


def parse_override(override: str) -> tuple[str, Any]:
    """`"edges.si_tt.enabled=false"` -> `("edges.si_tt.enabled", False)` (the value read as YAML).

    Raises:
        ConfigError: One line naming the override when it is not `key=value` or the value
            is not valid YAML.
    """
    key = override.split("=", 1)[0].strip()
    if "=" not in override or not key:
        raise ConfigError(f"override {override!r}: expected key=value")
    try:
        node: Any = OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
        for part in key.split("."):  # the value as written: an interpolation stays unresolved
            node = node[part]
        return key, node
    except Exception as e:  # yaml and grammar errors of many types: name the override
        what = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {what}") from e


def _allowed_keys(schema: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    try:
        return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:
        return []


def _drop(raw: DictConfig, full_key: str) -> bool:
    parts = full_key.split(".")
    node: Any = raw
    for p in parts[:-1]:
        if not isinstance(node, DictConfig) or p not in node:
            return False
        node = node[p]
    if isinstance(node, DictConfig) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def _kind(value: Any) -> str:
    if isinstance(value, DictConfig):
        return "a mapping"
    if isinstance(value, ListConfig):
        return "a list"
    value = value._value() if hasattr(value, "_value") else value  # a scalar node
    return f"{type(value).__name__} {value!r}"


def _check_shape(node: Any, hint: Any, path: str, problems: list[str]) -> bool:
    """Report and prune the parts of `node` whose shape (mapping, list) differs from the
    schema type `hint`; False when `node` itself has the wrong shape. Unknown keys inside
    list items (`stages[0].bogus`) are reported here, at their own path."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(node, DictConfig):
            problems.append(f"{path}: expected a mapping, got {_kind(node)}")
            return False
        hints = typing.get_type_hints(hint)
        for key in list(node.keys()):
            where = f"{path}.{key}" if path else str(key)
            if key not in hints:
                if "[" in path:  # omegaconf names list items badly: report it here
                    problems.append(f"{where}: unknown key (allowed: {', '.join(hints)})")
                    del node[key]
                continue
            if not _check_shape(node._get_node(key), hints[key], where, problems):
                del node[key]
        return True
    if origin is dict:
        if node is None or (hasattr(node, "_is_none") and node._is_none()):
            return True
        if not isinstance(node, DictConfig):
            problems.append(f"{path}: expected a mapping, got {_kind(node)}")
            return False
        for key in list(node.keys()):
            if not _check_shape(node._get_node(key), args[1], f"{path}.{key}", problems):
                del node[key]
        return True
    if origin is list:
        if not isinstance(node, ListConfig):
            problems.append(f"{path}: expected a list, got {_kind(node)}")
            return False
        bad = [i for i, item in enumerate(node) if not _check_shape(node._get_node(i), args[0], f"{path}[{i}]", problems)]
        for i in reversed(bad):
            del node[i]
        return True
    return True


def merge_with_schema(raw: DictConfig) -> tuple[DictConfig, list[str]]:
    """Merge a raw config into the `Config` schema, collecting every problem.

    omegaconf stops at the first bad key, so the offending key is reported, removed from
    the raw config and the merge retried until it succeeds.
    """
    schema = OmegaConf.structured(Config)
    problems: list[str] = []
    raw = raw.copy()
    for _ in range(200):
        try:
            cfg = OmegaConf.merge(schema, raw)
            break
        except OmegaConfBaseException as e:
            key = str(e.full_key or "")
            if isinstance(e, ConfigKeyError):
                allowed = _allowed_keys(schema, key)
                hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
                problems.append(f"{key}: unknown key{hint}")
            else:
                problems.append(f"{key}: {str(e.msg if hasattr(e, 'msg') else e).splitlines()[0]}")
            if not _drop(raw, key):
                return schema, problems
    else:  # pragma: no cover - needs 200 distinct bad keys
        return schema, problems
    reported = tuple(p.split(":", 1)[0] for p in problems)
    try:
        missing = OmegaConf.missing_keys(cfg)
    except OmegaConfBaseException:  # a bad interpolation: `schema_check`'s resolve reports it
        missing = set()
    problems += [f"{key}: missing value" for key in sorted(missing)
                 if not any(key == r or key.startswith((f"{r}.", f"{r}[")) for r in reported)]  # fmt: skip
    return cfg, problems


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, merge and schema-check a config (no semantic checks: see `distill.core.check`).

    Raises:
        ConfigError: with one line per problem, all problems at once.
    """
    config, problems = read_config(path, overrides)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def read_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config | None, list[str]]:
    """`load_config` that returns the schema problems instead of raising them, with the
    config minus its offending keys (None when a value is missing), so that a caller can
    add the semantic problems and report everything at once."""
    raw = load_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return schema_check(raw)


def apply_overrides(raw: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply dotted overrides to a raw config, in order. A mapping value merges into the
    mapping it names; a value of another shape (a list for a mapping, say) replaces it, for
    the schema check to report at its path. A key through a list (`stages.1.lr=1e-4`)
    updates that item in place.

    Raises:
        ConfigError: One line per override that is not `key=value`, is not valid YAML, or
            goes through a list item the config does not have.
    """
    raw, problems = raw.copy(), []
    for o in overrides:
        try:
            key, value = parse_override(o)
        except ConfigError as e:
            problems += e.problems
            continue
        parts = key.split(".")
        for i, part in enumerate(parts[1:], 1):
            parent = OmegaConf.select(raw, ".".join(parts[:i]), throw_on_resolution_failure=False)
            if part.isdigit() and not (isinstance(parent, ListConfig) and int(part) < len(parent)):
                have = f"{len(parent)} items" if isinstance(parent, ListConfig) else "no such list"
                problems.append(f"override {key!r}: {'.'.join(parts[:i])} has no item {part} ({have})")
                break
        else:
            try:
                OmegaConf.update(raw, key, value, merge=True)
            except (OmegaConfBaseException, TypeError, ValueError):  # another shape: replace it
                OmegaConf.update(raw, key, value, merge=False)
    if problems:
        raise ConfigError(problems)
    return raw


def prune_removed(raw: DictConfig) -> DictConfig:
    """Drop `models.<name>: null` and `edges.<name>: null`: how a file removes an inherited entry."""
    for section in ("models", "edges"):
        node = raw.get(section)
        if isinstance(node, DictConfig):
            for key in [k for k in node.keys() if node._get_node(k)._is_none()]:
                del node[key]
    return raw


def schema_check(raw: DictConfig) -> tuple[Config | None, list[str]]:
    """Schema-merge and resolve a raw config; (config without the bad keys, problems).

    The config is None when it cannot be checked further: a section or list of the wrong
    shape (a list where a mapping belongs), a missing value or a broken interpolation; a
    semantic check of such a config would only repeat the problem in other words.
    """
    raw = prune_removed(raw.copy())
    shape: list[str] = []
    _check_shape(raw, Config, "", shape)
    if shape:
        return None, shape
    cfg, problems = merge_with_schema(raw)
    if any(p.endswith(": missing value") for p in problems):
        return None, problems
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg), problems  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        return None, [*problems, f"{e.full_key}: {str(e).splitlines()[0]}"]


def config_from_raw(raw: DictConfig) -> Config:
    """Schema-merge and resolve an already merged raw config.

    Raises:
        ConfigError: One line per schema problem.
    """
    config, problems = schema_check(raw)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (what a run saves next to its checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain containers (for checkpoints' hyperparameters)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with `to_dict` (schema-checked; semantic checks are the caller's)."""
    return config_from_raw(OmegaConf.create(data))
