"""Ablation sweeps: one base experiment, many variants, one table.

```yaml
base: ../conaclip.yaml              # experiment YAML, relative to this file
output_dir: runs/ablations/edges    # one run folder per variant: <output_dir>/<variant>/
overrides: [trainer.max_steps=600]  # the training budget (and anything else) for every variant
split: test                         # where the students are evaluated
seeds: [0, 1, 2]                    # every variant once per seed (model init and data order)
zeroshot: embedded:colour           # optional: a zero-shot task scored for every run, a column next to RSUM
variants:                           # explicit variants, in table order
  - {name: full}
  - {name: task_only, edges: [si_st]}            # exactly these edges on, the others off
  - {name: no_fd, overrides: [edges.ti_si_fd.enabled=false]}
  - {name: mcad, base: ../mcad.yaml}             # another experiment: a methods table is a sweep too
grid:                               # and/or the product of these (after the explicit ones)
  edges: [[si_st], [si_st, ti_si]]  # edge subsets
  edges.si_st.args.temperature: [0.05, 0.1]
```

`distill sweep SWEEP.yaml [overrides...] [--seeds 0 1 2] [--variants a b]` validates every variant first (all
problems at once), then fits each (variant, seed) that has no `metrics.json` yet into
`<output_dir>/<variant>/seed<s>/` (an interrupted one resumes from its `last.ckpt`; without
`seeds`, one run per variant in `<output_dir>/<variant>/` at the config's seed), evaluates
each student on `split` (recalls and per-query ranks, cached beside its checkpoint) and
writes the ablation table (`distill.eval.ablation`): mean ± std over seeds, and each
variant's paired bootstrap interval against the first variant, the reference. Command-line
overrides apply to every variant, after the sweep's own `overrides` and before each
variant's.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from distill.config.load import from_dict, load_raw, prune_removed, read_yaml, to_dict
from distill.config.schema import Config
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.eval.ablation import write_ablation
from distill.eval.evaluate import evaluate_ranks, load_ranks, save_evaluation
from distill.eval.stats import METRICS
from distill.eval.zeroshot import evaluate_zeroshot, open_task, result_filename, save_zeroshot
from distill.training.cache.build import fill_cache
from distill.training.cache.store import cache_plan
from distill.training.checkpoint import load_checkpoint
from distill.training.stages import train

SAFE = re.compile(r"[^A-Za-z0-9_.,=+-]")


@dataclass
class VariantConfig:
    """One explicit variant: a name, optionally its own experiment, the exact set of enabled edges, overrides."""

    name: str = MISSING
    base: str | None = None
    """Another experiment YAML than the sweep's `base` (relative to the sweep file)."""
    edges: list[str] | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """A sweep file (see the module docstring)."""

    base: str = MISSING
    output_dir: str = MISSING
    overrides: list[str] = field(default_factory=list)
    split: str = "test"
    seeds: list[int] = field(default_factory=list)
    zeroshot: str | None = None
    """A zero-shot task (`embedded:colour`, an ImageFolder path) scored for every run, shown next to RSUM."""
    variants: list[VariantConfig] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)


def _to_object(schema: type, node: Any, where: str) -> Any:
    """`node` merged into a dataclass schema, or a one-line ConfigError at `where`."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except MissingMandatoryValue as e:
        raise ConfigError(f"{where}{e.full_key}: missing value") from e
    except ConfigKeyError as e:
        allowed = ", ".join(f.name for f in fields(schema))
        raise ConfigError(f"{where}{e.full_key}: unknown key (allowed: {allowed})") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}{e.full_key}: {str(e.msg if hasattr(e, 'msg') else e).splitlines()[0]}") from e


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and schema-check a sweep file; `base` becomes a path relative to the file's folder.

    Raises:
        ConfigError: One line per problem, starting with the file and the YAML path.
    """
    path = Path(path)
    raw = read_yaml(path, "sweep")
    raw_variants = raw.pop("variants", None) or []
    problems: list[str] = []
    variants = []
    for i, node in enumerate(raw_variants if isinstance(raw_variants, ListConfig) else [None]):
        try:
            if not isinstance(node, DictConfig):
                raise ConfigError(f"{path}: variants[{i}]: expected a mapping {{name, base, edges, overrides}}" if node is not None
                                  else f"{path}: variants: expected a list of variants")
            variants.append(_to_object(VariantConfig, node, f"{path}: variants[{i}]."))
        except ConfigError as e:
            problems += e.problems
    try:
        sweep: SweepConfig = _to_object(SweepConfig, raw, f"{path}: ")
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    for i, v in enumerate(variants):
        if v.base is not None:
            v.base = str((path.parent / v.base).resolve())
            if not Path(v.base).is_file():
                problems.append(f"{path}: variants[{i}].base: no such experiment file {v.base}")
    if problems:
        raise ConfigError(problems)
    sweep.variants = variants
    sweep.base = str((path.parent / sweep.base).resolve())
    return sweep


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _edge_overrides(edges: list[str], all_edges: list[str]) -> list[str]:
    return [f"edges.{e}.enabled={str(e in edges).lower()}" for e in all_edges]


Variant = tuple[str, list[str], str, str]
"""(name, overrides, YAML path in the sweep file, experiment file)."""


def expand(sweep: SweepConfig, edges_of: dict[str, list[str]]) -> tuple[list[Variant], list[str]]:
    """(variants, problems) for the explicit list then the grid; `edges_of` maps each experiment
    file (the sweep's base and any variant's own) to its edge names."""
    out: list[Variant] = []
    problems: list[str] = []
    all_edges = edges_of[sweep.base]
    for i, v in enumerate(sweep.variants):
        where, base = f"variants[{i}]", v.base or sweep.base
        for j, e in enumerate(v.edges or []):
            if e not in edges_of[base]:
                problems.append(f"{where}.edges[{j}]: unknown edge {e!r}; edges: {', '.join(edges_of[base])}")
        edges = _edge_overrides(v.edges, edges_of[base]) if v.edges is not None else []
        out.append((v.name, edges + list(v.overrides), where, base))
    keys = list(sweep.grid)
    for key in keys:
        if not isinstance(sweep.grid[key], list) or not sweep.grid[key]:
            problems.append(f"grid.{key}: expected a non-empty list of values")
        elif key == "edges":
            for j, subset in enumerate(sweep.grid[key]):
                bad = [e for e in (subset if isinstance(subset, list) else [None]) if e not in all_edges]
                if bad:
                    problems.append(f"grid.edges[{j}]: expected a list of edge names; unknown: {bad}")
    if problems or not keys:
        return out, problems
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        parts, overrides = [], []
        for key, value in zip(keys, combo):
            if key == "edges":
                parts.append("+".join(value))
                overrides += _edge_overrides(value, all_edges)
            else:
                short = key.removeprefix("edges.").replace(".args.", ".")
                parts.append(f"{short}={_value(value)}")
                overrides.append(f"{key}={_value(value)}")
        out.append((SAFE.sub("_", ",".join(parts)), overrides, f"grid ({', '.join(parts)})", sweep.base))
    return out, problems


def variant_configs(
    sweep: SweepConfig, extra: list[str] | None = None, seeds: list[int] | None = None
) -> dict[tuple[str, int | None], Config]:
    """Every (variant, seed)'s validated config (`resume: last`), in table order.

    Args:
        sweep: The sweep file.
        extra: Command-line overrides for every variant.
        seeds: Replace the file's `seeds`; empty or None keeps them.

    Raises:
        ConfigError: Every problem of every variant, each line prefixed by where it came from.
    """
    edges_of = {}  # each experiment's edge names; every variant's own config is checked in full below
    for base in dict.fromkeys([sweep.base, *(v.base for v in sweep.variants if v.base)]):
        try:
            edges_of[base] = list((prune_removed(load_raw(base)).get("edges") or {}).keys())
        except ConfigError as e:
            raise ConfigError([f"base ({base}): {p}" for p in e.problems]) from e
    variants, problems = expand(sweep, edges_of)
    if not variants:
        problems.append("variants: no variant; list some under variants: or grid:")
    seeds = list(seeds or sweep.seeds)
    if len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        problems.append(f"seeds: expected distinct integers >= 0, got {seeds}")
    configs: dict[tuple[str, int | None], Config] = {}
    names: set[str] = set()
    for name, overrides, where, experiment in variants:
        if not SAFE.sub("", name) == name or not name:
            problems.append(f"{where}.name: {name!r} must be letters, digits or _ . , = + -")
            continue
        if name in names:
            problems.append(f"{where}.name: duplicate variant name {name!r}")
            continue
        names.add(name)
        for seed in seeds or [None]:
            folder = Path(sweep.output_dir) / name / (f"seed{seed}" if seed is not None else "")
            by_seed = [f"seed={seed}", f"data.seed={seed}"] if seed is not None else []
            try:
                configs[name, seed] = load_checked(
                    experiment,
                    [*sweep.overrides, *(extra or []), *overrides, *by_seed, f"output_dir={folder}", "resume=last"],
                )
            except ConfigError as e:
                problems += [f"{where} ({name}): {p}" for p in e.problems]
                break
    if problems:
        raise ConfigError(problems)
    return configs


def enabled_edges(config: Config) -> list[str]:
    """The edges a run trains with (for a staged run, those of any stage)."""
    if config.stages:
        return list(dict.fromkeys(e for s in config.stages for e in s.edges))
    return [n for n, e in config.edges.items() if e.enabled]


def evaluate_variant(config: Config, split: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The trained student's metrics and per-query ranks on `split`, cached beside its checkpoint."""
    folder = Path(config.output_dir)
    cache, ckpt = folder / f"eval_{split}.json", folder / "final.ckpt"
    ranks_file = folder / f"eval_{split}.ranks.npz"
    if cache.is_file() and ranks_file.is_file() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        return json.loads(cache.read_text()), load_ranks(folder, split)
    trained = load_checkpoint(ckpt, trust=True)  # written by this sweep from the user's own YAML
    name = trained.config.eval.model
    metrics, ranks = evaluate_ranks(trained.graph.models[name], name, config, split)
    save_evaluation(folder, split, metrics, ranks)
    return metrics, ranks


def zeroshot_variant(config: Config, data: str) -> dict[str, Any]:
    """The trained student's zero-shot result on task `data`, cached beside its checkpoint."""
    folder = Path(config.output_dir)
    cache, ckpt = folder / result_filename(data), folder / "final.ckpt"
    if cache.is_file() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        return json.loads(cache.read_text())
    trained = load_checkpoint(ckpt, trust=True)  # written by this sweep from the user's own YAML
    name = trained.config.eval.model
    result = evaluate_zeroshot(trained.graph.models[name], name, open_task(data, config.data),
                               batch_size=config.data.eval_batch_size)
    save_zeroshot(folder, result)
    return result


IGNORED = ("trainer.progress_bar", "output_dir")
"""Settings a run folder may change between sweeps without making its results another run's
(a finished run of the same config linked or moved into another sweep's folder is reused)."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def changed_runs(configs: dict[tuple[str, int | None], Config]) -> list[str]:
    """One line per run folder that was started with another config than this sweep's for it
    (a changed budget or override): resuming or skipping it would mix two experiments."""
    problems = []
    for (name, seed), config in configs.items():
        saved = Path(config.output_dir) / "config.yaml"
        if not saved.is_file():
            continue
        old = OmegaConf.to_container(OmegaConf.load(saved))
        try:  # through the schema: a setting added since the run started compares at its default
            old = to_dict(from_dict(old))
        except ConfigError:  # a key since removed: compared as saved, so it shows as a change
            pass
        before, now = _flat(old), _flat(to_dict(config))
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in IGNORED]
        if diff:
            shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            label = name if seed is None else f"{name} seed {seed}"
            problems.append(f"{config.output_dir}: {label} was run with another config ({shown}{more}); delete the "
                            "folder to rerun it, or give the sweep another output_dir")  # fmt: skip
    return problems


def only_variants(configs: dict[tuple[str, int | None], Config], names: list[str]) -> dict[tuple[str, int | None], Config]:
    """The runs of the variants `names` (in table order; the first kept is the reference).

    Raises:
        ConfigError: A name the sweep does not have, with the names it has.
    """
    have = list(dict.fromkeys(name for name, _ in configs))
    bad = [n for n in names if n not in have]
    if bad:
        raise ConfigError(f"--variants: unknown variant {bad[0]!r}; the sweep has: {', '.join(have)}")
    return {key: c for key, c in configs.items() if key[0] in names}


def run_sweep(path: str | Path, extra: list[str] | None = None, seeds: list[int] | None = None,
              variants: list[str] | None = None) -> Path:
    """`distill sweep`: fit the missing runs, evaluate all, write the table; see above.

    Args:
        variants: Only these variants (run and tabled); None runs them all.

    Raises:
        ConfigError: A bad sweep or variant, or a run folder started with another config.
    """
    sweep = load_sweep(path)
    configs = variant_configs(sweep, extra, seeds)
    if variants:
        configs = only_variants(configs, variants)
    if sweep.zeroshot:
        open_task(sweep.zeroshot, next(iter(configs.values())).data)  # a bad task fails before any fit
    changed = changed_runs(configs)
    if changed:
        raise ConfigError(changed)
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for config in configs.values():  # the teachers' outputs once for every run (a no-op when cached)
        if config.cache.mode != "never" and cache_plan(config) and not (Path(config.output_dir) / "metrics.json").is_file():
            fill_cache(config, batch_size=config.data.eval_batch_size)
    for i, ((name, seed), config) in enumerate(configs.items()):
        label = name if seed is None else f"{name} seed {seed}"
        if (Path(config.output_dir) / "metrics.json").is_file():
            print(f"[{i + 1}/{len(configs)}] {label}: finished, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(configs)}] {label}: fitting into {config.output_dir}", flush=True)
        train(config)
    runs = []
    for (name, seed), config in configs.items():
        metrics, ranks = evaluate_variant(config, sweep.split)
        runs.append({"variant": name, "seed": seed if seed is not None else config.seed, "edges": enabled_edges(config),
                     **{m: metrics[m] for m in METRICS}, "ranks": ranks})  # fmt: skip
        if sweep.zeroshot:
            result = zeroshot_variant(config, sweep.zeroshot)
            runs[-1].update(zeroshot_top1=result["top1"], zeroshot_task=result["task"])
    return write_ablation(runs, out)
