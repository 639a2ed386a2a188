"""`distill graph CONFIG -o graph.png`: draw the graph, models as rows, outputs as columns."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands._args import config_arguments
from distill.config.schema import Config
from distill.core.check import load_checked, model_nodes
from distill.core.graph import split_node
from distill.io import atomic_path
from distill.models.intermediate import KINDS, parse_node


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("-o", "--output", default="graph.png", help="output image (png, svg, pdf)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    print(f"wrote {draw(load_checked(args.config, args.overrides), args.output)}")
    return 0


def _pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """The node pair an edge is drawn between: slots 0 and 1. For 4-input relational losses
    these are the student nodes whose similarity structure is matched to the teacher's, so
    S(SI, SI) vs S(TI, TI) is ConaCLIP's SI-SI loop and S(SI, ST) vs S(TI, TT) its SI-ST edge."""
    return [(inputs[0], inputs[min(1, len(inputs) - 1)])]  # a one-input edge (itm) is a loop


def drawn(node: str) -> str:
    """The circle a node is drawn as: a layer node's `<model>.<output>.<kind>`, one per kind
    (its layers go on the edge's label), any other node itself."""
    layer = parse_node(node)
    return layer.base if layer else node


def layer_label(inputs: list[str], layers: object) -> str:
    """The layers an edge reads, for its label: `[1] <- [3]`, or the layer map."""
    if layers is not None:
        return f"layers: {layers}" if isinstance(layers, str) else "layers: " + ", ".join(
            " <- ".join(str(i) for i in pair) for pair in layers)  # type: ignore[union-attr]
    indices = [f"[{n.index}]" for n in map(parse_node, inputs[:2]) if n is not None and n.index is not None]
    return " <- ".join(indices)


def column(kind: str) -> tuple[int, int]:
    """Columns: image and its layer kinds, then text and its layer kinds, then pair."""
    output, _, layer = kind.partition(".")
    return ({"image": 0, "text": 1}.get(output, 2), KINDS.index(layer) + 1 if layer in KINDS else 0)


def layout(config: Config, nodes: list[str]) -> dict[str, tuple[float, float]]:
    """One row per model (config order), one column per output kind (image, image layers,
    text, text layers, pair)."""
    models = list(dict.fromkeys(split_node(n)[0] for n in nodes))
    kinds = sorted(dict.fromkeys(split_node(n)[1] for n in nodes), key=column)
    def spread(i: int, n: int) -> float:
        return 0.0 if n == 1 else -1.0 + 2.0 * i / (n - 1)
    return {n: (spread(kinds.index(split_node(n)[1]), len(kinds)), -spread(models.index(split_node(n)[0]), len(models)))
            for n in nodes}


def draw(config: Config, path: str | Path) -> Path:
    """Draw the graph: models as rows, outputs as columns, one curve per edge (dashed grey
    when disabled), each labelled with its name and loss."""
    # matplotlib: heavy to import, needed only for the picture
    from matplotlib.figure import Figure  # matplotlib: heavy, only for plots
    from matplotlib.patches import Circle  # matplotlib: heavy, only for plots

    nodes = list(model_nodes(config, []))
    nodes += list(dict.fromkeys(drawn(n) for e in config.edges.values() for n in e.inputs if parse_node(n)))
    pos = layout(config, nodes)
    radius = min(0.17, 0.8 / max(len({x for x, _ in pos.values()}), 1))  # many columns: smaller circles
    fig = Figure(figsize=(8, 8))
    ax = fig.add_subplot()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    model_colour = {m: colours[i % len(colours)] for i, m in enumerate(config.models)}
    seen: dict[tuple[str, str], int] = {}
    for name, e in config.edges.items():
        label = layer_label(list(e.inputs), e.layers)
        for a, b in _pairs([drawn(n) for n in e.inputs]):
            if a not in pos or b not in pos:
                continue
            k = seen.get(tuple(sorted((a, b))), 0)
            seen[tuple(sorted((a, b)))] = k + 1
            style = dict(color="tab:blue" if e.enabled else "0.6", ls="-" if e.enabled else "--",
                         lw=1.8 if e.enabled else 1.0)
            (xa, ya), (xb, yb) = pos[a], pos[b]
            if a == b:  # relational loop, drawn outward from the centre
                r = 0.16 + 0.09 * k
                ox, oy = (xa or 0.001) / max(abs(xa), 1e-3), (ya or 0.001) / max(abs(ya), 1e-3)
                cx, cy = xa + 0.7 * r * ox * 0.7, ya + r * oy * 0.9
                ax.add_patch(Circle((cx, cy), r, fill=False, **style))
                lx, ly = cx + r * ox * 0.9, cy + r * oy * 0.9
            else:
                bend = (0.22 * ((k + 1) // 2)) * (1 if k % 2 else -1) if k else 0.0
                bend = bend or (0.3 if ya == yb else 0.0)  # along a row: curve clear of the circles between
                mx = (xa + xb) / 2 - bend * (yb - ya)
                my = (ya + yb) / 2 + bend * (xb - xa)
                ts = [i / 30 for i in range(31)]
                xs = [(1 - t) ** 2 * xa + 2 * (1 - t) * t * mx + t**2 * xb for t in ts]
                ys = [(1 - t) ** 2 * ya + 2 * (1 - t) * t * my + t**2 * yb for t in ts]
                ax.plot(xs, ys, **style)
                at = 12 if (xa != xb and ya != yb) else 15  # diagonals: label off the crossing
                lx, ly = xs[at], ys[at]
            ax.text(lx, ly, f"{name}\n{e.loss}" + (f"\n{label}" if label else ""), fontsize=7, ha="center", va="center",
                    color="black" if e.enabled else "0.45", zorder=5,
                    bbox=dict(fc="white", ec="0.8" if e.enabled else "none", alpha=0.85, boxstyle="round,pad=0.2"))
    for n, (x, y) in pos.items():
        model = split_node(n)[0]
        ax.add_patch(Circle((x, y), radius, color=model_colour[model], zorder=3))
        frozen = config.models[model].frozen
        ax.text(x, y, n.replace(".", "\n") + ("\n(frozen)" if frozen else ""), ha="center", va="center",
                fontsize=8 if radius >= 0.17 else 6, color="white", zorder=4, weight="bold")
    ax.set_xlim(-1.7, 1.7)
    ax.set_ylim(-1.7, 1.7)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{config.name}: solid = enabled edge, dashed = disabled")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return Path(path)
