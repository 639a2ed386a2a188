"""YAML loading: `extends:` chains, `key=value` overrides, the schema merge.

`load_config(path, overrides)` returns a schema-checked `Config` or raises one
`ConfigError` with every problem, one line each, starting with the dotted YAML path.
Loading never runs the semantic checks against the registries: the command decides
(`distill.core.check.load_checked` loads and checks, all problems together).
"""

from __future__ import annotations

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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from e
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
        merged = OmegaConf.merge(
            merged, load_raw(path.parent / str(base), (*_seen, path), f"{path}: extends[{i}]")
        )
    return OmegaConf.merge(merged, raw)


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`["edges.si_tt.enabled=false", ...]` -> a config to merge on top (YAML-typed values)."""
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError([f"override {o!r}: expected key=value" for o in bad])
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {str(e).splitlines()[0]}") from e


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
    for key in OmegaConf.missing_keys(cfg):
        problems.append(f"{key}: missing value")
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
    """Merge dotted overrides into a raw config; a key through a list (`stages.1.lr=1e-4`)
    updates that item in place, since merging a mapping into a list fails in omegaconf."""
    parsed = parse_overrides(overrides)
    through_list = []
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        parts = key.split(".")
        prefixes = (OmegaConf.select(raw, ".".join(parts[:i]), throw_on_resolution_failure=False) for i in range(1, len(parts)))
        if any(isinstance(node, ListConfig) for node in prefixes):
            through_list.append(key)
    for key in through_list:
        value = OmegaConf.select(parsed, key)
        try:
            OmegaConf.update(raw, key, value, merge=True)
        except (OmegaConfBaseException, IndexError, ValueError) as e:
            raise ConfigError(f"override {key!r}: {str(e).splitlines()[0]}") from e
        _drop(parsed, key)
    while through_list and _prune_empty(parsed):
        pass
    return OmegaConf.merge(raw, parsed)


def _prune_empty(node: DictConfig) -> bool:
    """Delete empty mappings left behind by `_drop`; True if anything was deleted."""
    pruned = False
    for key in list(node.keys()):
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            if len(child) == 0:
                del node[key]
                pruned = True
            else:
                pruned = _prune_empty(child) or pruned
    return pruned


def prune_removed(raw: DictConfig) -> DictConfig:
    """Drop `models.<name>: null` and `edges.<name>: null`: how a file removes an inherited entry."""
    for section in ("models", "edges"):
        node = raw.get(section)
        if isinstance(node, DictConfig):
            for key in [k for k in node.keys() if node._get_node(k)._is_none()]:
                del node[key]
    return raw


def schema_check(raw: DictConfig) -> tuple[Config | None, list[str]]:
    """Schema-merge and resolve a raw config; (config without the bad keys, problems)."""
    cfg, problems = merge_with_schema(prune_removed(raw.copy()))
    if any(p.endswith(": missing value") for p in problems):
        return None, problems
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        return None, [*problems, f"{e.full_key}: {str(e).splitlines()[0]}"]
    return OmegaConf.to_object(cfg), problems  # type: ignore[return-value]


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
