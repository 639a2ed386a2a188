"""The teacher-vs-students comparison report: `report.json`, `report.md` and `report.png`.

A row describes one model:
`{"name", "params", "rsum", "i2t": {"r1", "r5", "r10"}, "t2i": {...}, "image_ms", "text_ms"}`
with recalls in percent and latencies in ms per item. The first row (usually the
teacher) is the reference of the relative columns. A row may also carry a zero-shot
classification result (`distill.eval.zeroshot`): `"zeroshot_top1"` (percent) and
`"zeroshot_task"` (`embedded:shape`, say); the table then shows it next to RSUM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.io import atomic_path, write_json, write_text

ROW_KEYS = ("name", "params", "rsum", "i2t", "t2i", "image_ms", "text_ms")
ZEROSHOT_KEYS = ("zeroshot_top1", "zeroshot_task")
"""Optional row keys: a zero-shot top-1 accuracy and the task it was measured on."""
RECALL_KEYS = ("r1", "r5", "r10")
DIRECTIONS = ("i2t", "t2i")


def metrics_to_row(
    name: str,
    metrics: Mapping[str, float],
    params: int,
    image_ms: float,
    text_ms: float,
    zeroshot: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a report row from the output of `retrieval_metrics` and efficiency figures.

    Args:
        name: The model's display name.
        metrics: Must hold `i2t_r1/5/10`, `t2i_r1/5/10` and `rsum`.
        params: Parameter count.
        image_ms: Latency per image, in ms.
        text_ms: Latency per caption, in ms.
        zeroshot: A zero-shot result (`distill.eval.zeroshot.evaluate_zeroshot`, or its
            `zeroshot_<task>.json`); its top-1 and task join the row.

    Returns:
        The row dict described in the module docstring.
    """
    needed = [f"{d}_{r}" for d in DIRECTIONS for r in RECALL_KEYS] + ["rsum"]
    missing = [key for key in needed if key not in metrics]
    if missing:
        raise KeyError(f"metrics for {name!r} lack {missing}; got {sorted(metrics)}")
    row = {
        "name": name,
        "params": int(params),
        "rsum": float(metrics["rsum"]),
        "i2t": {r: float(metrics[f"i2t_{r}"]) for r in RECALL_KEYS},
        "t2i": {r: float(metrics[f"t2i_{r}"]) for r in RECALL_KEYS},
        "image_ms": float(image_ms),
        "text_ms": float(text_ms),
    }
    if zeroshot is not None:
        row.update(zeroshot_top1=float(zeroshot["top1"]), zeroshot_task=str(zeroshot["task"]))
    return row


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise ValueError naming every row that lacks a key."""
    if not rows:
        raise ValueError("the report needs at least one row")
    problems = []
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        missing += [
            f"{d}.{r}" for d in DIRECTIONS if d in row for r in RECALL_KEYS if r not in row[d]
        ]
        if missing:
            problems.append(f"row {i} ({row.get('name', '?')}): missing {missing}")
        if "zeroshot_top1" in row and not isinstance(row["zeroshot_top1"], int | float):
            problems.append(f"row {i} ({row.get('name', '?')}): zeroshot_top1 must be a number")
    if problems:
        raise ValueError("bad report rows:\n" + "\n".join(problems))


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}×" if den > 0 else "n/a"


def _zeroshot_header(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The zero-shot column's header (naming the task when all rows share one), or None."""
    if not any("zeroshot_top1" in row for row in rows):
        return None
    tasks = {row.get("zeroshot_task") for row in rows if "zeroshot_top1" in row}
    return f"Zero-shot top-1 ({tasks.pop()})" if len(tasks) == 1 and None not in tasks else "Zero-shot top-1"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows, with params and speed relative to the first row.

    "Params ×" is params / first row's params; "Speed-up" is the first row's
    (image_ms + text_ms) over this row's, i.e. for encoding one image and one caption.
    When a row carries `zeroshot_top1`, a zero-shot column follows RSUM ("–" for the rows
    without one).

    Returns:
        The table, one line per row after the header, without a trailing newline.
    """
    _check_rows(rows)
    header = [
        "Model", "Params (M)",
        "I2T R@1", "I2T R@5", "I2T R@10", "T2I R@1", "T2I R@5", "T2I R@10",
        "RSUM", "Image ms", "Text ms", "Params ×", "Speed-up",
    ]  # fmt: skip
    zeroshot = _zeroshot_header(rows)
    if zeroshot:
        header.insert(header.index("RSUM") + 1, zeroshot)
    ref = rows[0]
    ref_ms = ref["image_ms"] + ref["text_ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [str(row["name"]), f"{row['params'] / 1e6:.2f}"]
        cells += [f"{row[d][r]:.2f}" for d in DIRECTIONS for r in RECALL_KEYS]
        cells += [f"{row['rsum']:.2f}"]
        if zeroshot:
            cells += [f"{row['zeroshot_top1']:.2f}" if "zeroshot_top1" in row else "–"]
        cells += [f"{row['image_ms']:.2f}", f"{row['text_ms']:.2f}"]
        cells += [_ratio(row["params"], ref["params"])]
        cells += [_ratio(ref_ms, row["image_ms"] + row["text_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: Sequence[Mapping[str, Any]], path: Path, dataset: str) -> None:
    """Recall bars per model (left), params and latency bars (right), saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: heavy, only for plots
    from matplotlib.figure import Figure  # matplotlib: heavy, only for plots

    fig = Figure(figsize=(14, 5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    labels = [f"{d.upper()} R@{r[1:]}" for d in DIRECTIONS for r in RECALL_KEYS]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row[d][r] for d in DIRECTIONS for r in RECALL_KEYS]
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(labels))]
        left.bar(xs, values, width, label=str(row["name"]))
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("recall (%)")
    left.set_ylim(0, 100)
    left.set_title(f"Retrieval recall on {dataset}")
    left.legend(fontsize="small")

    names = [str(row["name"]) for row in rows]
    xs = range(len(rows))
    right.bar([x - 0.27 for x in xs], [r["params"] / 1e6 for r in rows], 0.27,
              color="tab:gray", label="params (M)")  # fmt: skip
    right.set_ylabel("parameters (M)")
    ms = right.twinx()
    ms.bar(xs, [r["image_ms"] for r in rows], 0.27, color="tab:blue", label="image ms")
    ms.bar([x + 0.27 for x in xs], [r["text_ms"] for r in rows], 0.27,
           color="tab:orange", label="text ms")  # fmt: skip
    ms.set_ylabel("latency (ms per item)")
    right.set_xticks(list(xs), names)
    right.set_title("Size and CPU latency")
    handles = right.get_legend_handles_labels()[0] + ms.get_legend_handles_labels()[0]
    right.legend(handles, [str(h.get_label()) for h in handles], fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def write_report(
    rows: Sequence[Mapping[str, Any]], out_dir: Path, dataset: str, notes: Sequence[str] = ()
) -> dict[str, Any]:
    """Write `report.json`, `report.md` and `report.png` into `out_dir` (created if needed).

    Args:
        rows: One row per model (see the module docstring); the first is the reference.
        out_dir: Destination folder.
        dataset: The evaluation set's name, shown in every file.
        notes: Paragraphs shown under the table (and kept in `report.json`).

    Returns:
        The content of `report.json`: `{"dataset": dataset, "models": rows}`.

    Raises:
        ValueError: If there are no rows or a row lacks a key.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"dataset": dataset, "models": [dict(row) for row in rows], "notes": list(notes)}
    write_json(out_dir / "report.json", report)
    md = [
        f"# Retrieval report: {dataset}",
        "",
        format_table(rows),
        "",
        f"Recall in percent; latency in ms per item on the CPU. Params × and Speed-up are "
        f"relative to {rows[0]['name']} (speed-up over encoding one image and one caption)."
        + (" Zero-shot top-1: classification accuracy in percent (`docs/zeroshot.md`)."
           if _zeroshot_header(rows) else ""),
        "",
        *(line for note in notes for line in (note, "")),
        "![report](report.png)",
        "",
    ]
    write_text(out_dir / "report.md", "\n".join(md))
    _plot(rows, out_dir / "report.png", dataset)
    return report
