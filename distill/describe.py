"""Human-readable views of a config's graph: the `validate` text and the `graph` picture."""

from __future__ import annotations

import math
from pathlib import Path

from distill.build import models_to_load
from distill.config import Config
from distill.graph import split_node
from distill.validate import model_nodes


def describe(config: Config) -> str:
    """Models (which will run), nodes with widths, enabled and disabled edges."""
    nodes = model_nodes(config, [])
    loaded = set(models_to_load(config))
    running = {split_node(n)[0] for e in config.edges.values() if e.enabled for n in e.inputs}
    lines = [f"experiment {config.name!r} -> {config.output_dir}", "models:"]
    for name, m in config.models.items():
        role = "frozen teacher" if m.frozen else "trainable"
        state = "runs in training" if name in running else ("loaded for eval only" if name in loaded else "not loaded")
        lines.append(f"  {name:<12} {m.type:<14} {role:<15} {state}")
    lines.append("nodes:")
    for node, dim in nodes.items():
        lines.append(f"  {node:<20} dim {dim}")
    for title, flag in (("enabled edges:", True), ("disabled edges:", False)):
        chosen = [(n, e) for n, e in config.edges.items() if e.enabled is flag]
        lines.append(title if chosen else f"{title} none")
        for name, e in chosen:
            lines.append(f"  {name:<14} {e.loss:<15} w={e.weight:<6g} {' , '.join(e.inputs)}")
    return "\n".join(lines)


def _pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """Node pairs an edge connects: (slot 0, slot 1) for 2-input losses; student-teacher
    slot pairs (0, 2) and (1, 3) for 4-input relational losses."""
    if len(inputs) == 4:
        raw = [(inputs[0], inputs[2]), (inputs[1], inputs[3])]
    else:
        raw = [(inputs[0], inputs[-1])]
    return list(dict.fromkeys(tuple(sorted(p)) for p in raw))  # type: ignore[misc]


def draw(config: Config, path: str | Path) -> Path:
    """Draw nodes on a circle, one line per edge (dashed grey when disabled), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = list(model_nodes(config, []))
    pos = {
        n: (math.cos(2 * math.pi * i / len(nodes) + math.pi / 4), math.sin(2 * math.pi * i / len(nodes) + math.pi / 4))
        for i, n in enumerate(nodes)
    }
    colours = plt.get_cmap("tab10")
    model_colour = {m: colours(i % 10) for i, m in enumerate(config.models)}
    fig, ax = plt.subplots(figsize=(7, 7))
    seen: dict[tuple[str, str], int] = {}
    for name, e in config.edges.items():
        for a, b in _pairs(list(e.inputs)):
            k = seen.get((a, b), 0)
            seen[(a, b)] = k + 1
            style = dict(color="tab:blue" if e.enabled else "0.6", ls="-" if e.enabled else "--", lw=2 if e.enabled else 1)
            (xa, ya), (xb, yb) = pos[a], pos[b]
            if a == b:
                loop = plt.Circle((xa * 1.18, ya * 1.18), 0.12 + 0.04 * k, fill=False, **style)
                ax.add_patch(loop)
                lx, ly = xa * 1.45, ya * 1.45 + 0.08 * k
            else:
                bend = 0.15 * k
                mx, my = (xa + xb) / 2 - bend * (yb - ya), (ya + yb) / 2 + bend * (xb - xa)
                ts = [i / 20 for i in range(21)]
                xs = [(1 - t) ** 2 * xa + 2 * (1 - t) * t * mx + t**2 * xb for t in ts]
                ys = [(1 - t) ** 2 * ya + 2 * (1 - t) * t * my + t**2 * yb for t in ts]
                ax.plot(xs, ys, **style)
                lx, ly = xs[10], ys[10]
            ax.text(lx, ly, f"{name}\n{e.loss}", fontsize=7, ha="center", va="center",
                    color="black" if e.enabled else "0.5", bbox=dict(fc="white", ec="none", alpha=0.7))
    for n, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), 0.13, color=model_colour[split_node(n)[0]], zorder=3))
        frozen = config.models[split_node(n)[0]].frozen
        ax.text(x, y, n.replace(".", "\n") + ("\n(frozen)" if frozen else ""), ha="center", va="center",
                fontsize=7, color="white", zorder=4)
    ax.set_xlim(-1.8, 1.8)
    ax.set_ylim(-1.8, 1.8)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{config.name}: solid = enabled edge, dashed = disabled")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
