"""Ablation sweeps: one base experiment, many variants, one table.

```yaml
base: ../conaclip.yaml              # experiment YAML, relative to this file
output_dir: runs/ablations/edges    # one run folder per variant: <output_dir>/<variant>/
overrides: [trainer.max_steps=600]  # the training budget (and anything else) for every variant
split: test                         # where the students are evaluated
variants:                           # explicit variants, in table order
  - {name: full}
  - {name: task_only, edges: [si_st]}            # exactly these edges on, the others off
  - {name: no_fd, overrides: [edges.ti_si_fd.enabled=false]}
grid:                               # and/or the product of these (after the explicit ones)
  edges: [[si_st], [si_st, ti_si]]  # edge subsets
  edges.si_st.args.temperature: [0.05, 0.1]
```

`distill sweep SWEEP.yaml [overrides...]` validates every variant first (all problems at
once), then fits each variant that has no `metrics.json` yet (an interrupted one resumes
from its `last.ckpt`), evaluates each student on `split` (cached in `eval_<split>.json`)
and writes `sweep.csv`, `sweep.md` and `sweep.png` into `output_dir`. The first variant is
the reference of the delta column. Command-line overrides apply to every variant, after
the sweep's own `overrides` and before each variant's.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from distill.config.load import read_yaml
from distill.config.schema import Config
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.eval.evaluate import evaluate_encoder
from distill.io import atomic_path, write_json, write_text
from distill.training.checkpoint import load_checkpoint
from distill.training.stages import train

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
SAFE = re.compile(r"[^A-Za-z0-9_.,=+-]")


@dataclass
class VariantConfig:
    """One explicit variant: a name, optionally the exact set of enabled edges, overrides."""

    name: str = MISSING
    edges: list[str] | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """A sweep file (see the module docstring)."""

    base: str = MISSING
    output_dir: str = MISSING
    overrides: list[str] = field(default_factory=list)
    split: str = "test"
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
                raise ConfigError(f"{path}: variants[{i}]: expected a mapping {{name, edges, overrides}}" if node is not None
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
    sweep.variants = variants
    sweep.base = str((path.parent / sweep.base).resolve())
    return sweep


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _edge_overrides(edges: list[str], all_edges: list[str]) -> list[str]:
    return [f"edges.{e}.enabled={str(e in edges).lower()}" for e in all_edges]


def expand(sweep: SweepConfig, all_edges: list[str]) -> tuple[list[tuple[str, list[str], str]], list[str]]:
    """(variants as (name, overrides, YAML path), problems) for the explicit list then the grid."""
    out: list[tuple[str, list[str], str]] = []
    problems: list[str] = []
    for i, v in enumerate(sweep.variants):
        where = f"variants[{i}]"
        for j, e in enumerate(v.edges or []):
            if e not in all_edges:
                problems.append(f"{where}.edges[{j}]: unknown edge {e!r}; edges: {', '.join(all_edges)}")
        edges = _edge_overrides(v.edges, all_edges) if v.edges is not None else []
        out.append((v.name, edges + list(v.overrides), where))
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
        out.append((SAFE.sub("_", ",".join(parts)), overrides, f"grid ({', '.join(parts)})"))
    return out, problems


def variant_configs(sweep: SweepConfig, extra: list[str] | None = None) -> dict[str, Config]:
    """Every variant's validated config (output_dir `<output_dir>/<name>`, `resume: last`).

    Raises:
        ConfigError: Every problem of every variant, each line prefixed by where it came from.
    """
    try:
        base = load_checked(sweep.base, [*sweep.overrides, *(extra or [])])
    except ConfigError as e:
        raise ConfigError([f"base ({sweep.base}): {p}" for p in e.problems]) from e
    variants, problems = expand(sweep, list(base.edges))
    if not variants:
        problems.append("variants: no variant; list some under variants: or grid:")
    configs: dict[str, Config] = {}
    for name, overrides, where in variants:
        if not SAFE.sub("", name) == name or not name:
            problems.append(f"{where}.name: {name!r} must be letters, digits or _ . , = + -")
            continue
        if name in configs:
            problems.append(f"{where}.name: duplicate variant name {name!r}")
            continue
        folder = Path(sweep.output_dir) / name
        try:
            configs[name] = load_checked(
                sweep.base, [*sweep.overrides, *(extra or []), *overrides, f"output_dir={folder}", "resume=last"]
            )
        except ConfigError as e:
            problems += [f"{where} ({name}): {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return configs


def enabled_edges(config: Config) -> list[str]:
    """The edges a run trains with (for a staged run, those of any stage)."""
    if config.stages:
        return list(dict.fromkeys(e for s in config.stages for e in s.edges))
    return [n for n, e in config.edges.items() if e.enabled]


def evaluate_variant(config: Config, split: str) -> dict[str, float]:
    """The trained student's retrieval metrics on `split`, cached next to its checkpoint."""
    folder = Path(config.output_dir)
    cache, ckpt = folder / f"eval_{split}.json", folder / "final.ckpt"
    if cache.is_file() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        return json.loads(cache.read_text())
    module = load_checkpoint(ckpt)
    name = module.config.eval.model
    metrics = evaluate_encoder(module.graph.models[name], name, config, split)
    write_json(cache, metrics, sort_keys=True)
    return metrics


def write_outputs(rows: list[dict[str, Any]], out: Path) -> Path:
    """`sweep.csv`, `sweep.md` and `sweep.png` of the rows; returns the Markdown path."""
    ref = rows[0]["rsum"]
    for row in rows:
        row["delta_rsum"] = row["rsum"] - ref
    columns = ["variant", "edges", *METRICS, "delta_rsum"]
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**r, "edges": " ".join(r["edges"])} for r in rows)
    head = "| variant | enabled edges | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 | RSUM | Δ RSUM |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        recalls = " | ".join(f"{r[m]:.1f}" for m in METRICS[:-1])
        delta = "ref" if r is rows[0] else f"{r['delta_rsum']:+.1f}"
        lines.append(f"| {r['variant']} | {', '.join(r['edges'])} | {recalls} | {r['rsum']:.1f} | {delta} |")
    md = out / "sweep.md"
    write_text(md, f"Δ RSUM is relative to `{rows[0]['variant']}`.\n\n" + "\n".join(lines) + "\n")
    _plot(rows, out / "sweep.png")
    return md


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: heavy, only for plots
    from matplotlib.figure import Figure  # matplotlib: heavy, only for plots

    fig = Figure(figsize=(max(5.0, 0.8 * len(rows) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names, rsums = [r["variant"] for r in rows], [r["rsum"] for r in rows]
    bars = ax.bar(range(len(rows)), rsums, color=["#4c72b0"] + ["#8c8c8c"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(rsums[0], color="#4c72b0", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylim(0, max(max(rsums), 1.0) * 1.12)
    ax.set_ylabel("RSUM")
    ax.set_title("RSUM per variant")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def run_sweep(path: str | Path, extra: list[str] | None = None) -> Path:
    """`distill sweep`: fit the missing variants, evaluate all, write the table; see above."""
    sweep = load_sweep(path)
    configs = variant_configs(sweep, extra)
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, config) in enumerate(configs.items()):
        if (Path(config.output_dir) / "metrics.json").is_file():
            print(f"[{i + 1}/{len(configs)}] {name}: finished, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(configs)}] {name}: fitting into {config.output_dir}", flush=True)
        train(config)
    rows = []
    for name, config in configs.items():
        metrics = evaluate_variant(config, sweep.split)
        rows.append({"variant": name, "edges": enabled_edges(config), **{m: metrics[m] for m in METRICS}})
    return write_outputs(rows, out)
