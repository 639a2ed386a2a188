"""The ablation table: variants x seeds -> mean ± std per metric, and each variant's
difference to the reference with a paired bootstrap interval (`distill.eval.stats`).

Writes `sweep.csv` (one row per variant and seed), `sweep.md` (one row per variant) and
`sweep.png` (RSUM per variant, and its difference to the reference with the interval).
Runs that carry a zero-shot top-1 (`zeroshot_top1`, percent, and `zeroshot_task`; see
`distill.eval.zeroshot`) get a zero-shot column next to RSUM, mean ± std over seeds.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.eval.stats import METRICS, Difference, compare_runs, mean_std
from distill.io import atomic_path, write_json, write_text

Run = Mapping[str, Any]
"""One fitted and evaluated run: {"variant", "seed", "edges", <metric>: value, "ranks": Ranks},
optionally "zeroshot_top1" and "zeroshot_task"."""
ZEROSHOT = "zeroshot_top1"


def summarize(runs: Sequence[Run], *, draws: int = 1000) -> list[dict[str, Any]]:
    """One entry per variant (first-seen order): mean and std of each metric over its seeds
    and, for every variant after the first (the reference), its paired difference on RSUM
    and on each recall, over the seeds both have."""
    variants: dict[str, list[Run]] = {}
    for run in runs:
        variants.setdefault(run["variant"], []).append(run)
    ref_name = next(iter(variants))
    ref = {r["seed"]: r for r in variants[ref_name]}
    out = []
    for name, group in variants.items():
        entry: dict[str, Any] = {"variant": name, "edges": group[0]["edges"], "seeds": [r["seed"] for r in group]}
        for m in METRICS:
            entry[m], entry[f"{m}_std"] = mean_std([r[m] for r in group])
        if all(ZEROSHOT in r for r in group):
            entry[ZEROSHOT], entry[f"{ZEROSHOT}_std"] = mean_std([r[ZEROSHOT] for r in group])
            entry["zeroshot_task"] = group[0].get("zeroshot_task")
        if name != ref_name:
            paired = [(r, ref[r["seed"]]) for r in group if r["seed"] in ref]
            diffs = compare_runs([r["ranks"] for r, _ in paired], [b["ranks"] for _, b in paired], draws=draws)
            entry["vs_reference"] = {d.metric: d.as_dict() for d in diffs}
        out.append(entry)
    return out


def _delta(entry: Mapping[str, Any], metric: str = "rsum") -> str:
    d = entry.get("vs_reference", {}).get(metric)
    if d is None:
        return "ref"
    mark = " ✓" if d["resolved"] else ""
    return f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]{mark}"


def _mean(e: Mapping[str, Any], m: str) -> str:
    if m not in e:
        return "–"
    return f"{e[m]:.1f} ± {e[f'{m}_std']:.1f}" if len(e["seeds"]) > 1 else f"{e[m]:.1f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table: mean ± std (over seeds) per metric, Δ RSUM with its interval, and
    a zero-shot top-1 column after RSUM when any variant has one."""
    tasks = {e.get("zeroshot_task") for e in summary if ZEROSHOT in e}
    columns = ["variant", "enabled edges", "seeds", "I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "RSUM"]
    metrics = list(METRICS)
    if tasks:
        task = next(iter(tasks)) if len(tasks) == 1 else None
        columns.append(f"zero-shot top-1 ({task})" if task else "zero-shot top-1")
        metrics.append(ZEROSHOT)
    columns += ["Δ RSUM [95% CI]", "sign-test p"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for e in summary:
        cells = [_mean(e, m) for m in metrics]
        p = e.get("vs_reference", {}).get("rsum", {}).get("p_sign")
        lines.append(f"| {e['variant']} | {', '.join(e['edges'])} | {len(e['seeds'])} | {' | '.join(cells)} "
                     f"| {_delta(e)} | {'' if p is None else f'{p:.2g}'} |")  # fmt: skip
    return "\n".join(lines)


def write_ablation(runs: Sequence[Run], out: Path, *, draws: int = 1000) -> Path:
    """`sweep.csv`, `sweep.json`, `sweep.md` and `sweep.png` into `out`; returns the Markdown path."""
    summary = summarize(runs, draws=draws)
    metrics = [*METRICS, *([ZEROSHOT] if any(ZEROSHOT in r for r in runs) else [])]
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", "edges", *metrics])
        writer.writeheader()
        writer.writerows({"variant": r["variant"], "seed": r["seed"], "edges": " ".join(r["edges"]),
                          **{m: r.get(m, "") for m in metrics}} for r in runs)  # fmt: skip
    write_json(out / "sweep.json", summary)
    ref = summary[0]["variant"]
    seeds = sorted({s for e in summary for s in e["seeds"]})
    note = (f"Mean ± standard deviation over seeds {seeds}. Δ RSUM is relative to `{ref}`, paired over the same "
            "seeds and test queries; the interval is a 95% paired bootstrap over queries (pooled over seeds) and ✓ "
            "marks an interval that excludes 0. The sign test counts queries whose RSUM contribution rose against "
            "those where it fell.")  # fmt: skip
    if ZEROSHOT in metrics:
        note += (" Zero-shot top-1 is classification accuracy in percent (`docs/zeroshot.md`), mean ± std over "
                 "seeds, without an interval.")  # fmt: skip
    md = write_text(out / "sweep.md", f"{note}\n\n{format_table(summary)}\n\n![sweep](sweep.png)\n")
    plot(summary, out / "sweep.png")
    return md


def plot(summary: Sequence[Mapping[str, Any]], path: Path) -> None:
    """RSUM per variant (mean, std whiskers) and Δ RSUM vs the reference with its interval."""
    # matplotlib: heavy, only for plots
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(summary)
    fig = Figure(figsize=(max(8.0, 1.1 * n + 4), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    names = [e["variant"] for e in summary]
    means, stds = [e["rsum"] for e in summary], [e["rsum_std"] for e in summary]
    bars = left.bar(range(n), means, yerr=stds, capsize=3, color=["#4c72b0"] + ["#8c8c8c"] * (n - 1))
    left.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    left.set_xticks(range(n), names, rotation=30, ha="right")
    left.set_ylabel("RSUM (mean ± std over seeds)")
    left.set_title("RSUM per variant")
    rows = [e for e in summary if "vs_reference" in e]
    for y, e in enumerate(rows):
        d: dict[str, Any] = e["vs_reference"]["rsum"]
        colour = "tab:green" if d["resolved"] and d["delta"] > 0 else "tab:red" if d["resolved"] else "0.5"
        right.errorbar(d["delta"], y, xerr=[[d["delta"] - d["low"]], [d["high"] - d["delta"]]], fmt="o",
                       color=colour, capsize=3)  # fmt: skip
    right.axvline(0, color="0.3", linewidth=0.8)
    right.set_yticks(range(len(rows)), [e["variant"] for e in rows])
    right.invert_yaxis()
    right.set_xlabel(f"Δ RSUM vs {summary[0]['variant']} (95% CI)")
    right.set_title("Difference to the reference")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def difference_line(d: Difference) -> str:
    """One line: `rsum  +12.3 [+4.1, +20.2]  p=0.003 (wins 812, losses 640)`."""
    mark = "resolved" if d.resolved else "unresolved"
    return (f"{d.metric:<8} {d.a:8.2f} {d.b:8.2f} {d.delta:+8.2f}  [{d.low:+.2f}, {d.high:+.2f}] {mark:<10} "
            f"p={d.p_sign:.3g} (wins {d.wins}, losses {d.losses})")
