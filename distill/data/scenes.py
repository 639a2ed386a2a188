"""Procedural scenes of coloured shapes: sampling, near-duplicate variants and rendering.

A scene puts 2-4 groups of identical shapes (shape, colour, size, 1-3 copies) on a 3x3
grid. Scenes come in families: a base scene and variants that swap colours between two
groups, mirror the layout, swap two positions, or change one count, colour, shape or size.
Family members share most words, so telling them apart needs the binding of colour to
shape, the direction of a relation and the counts, not a bag of words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 185),
    "pink": (250, 135, 195),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
    "brown": (125, 75, 35),
}
SIZES = ("small", "large")
CELLS = tuple((r, c) for r in range(3) for c in range(3))
VARIANTS = ("swap_colours", "mirror", "swap_positions", "recount", "recolour", "reshape", "resize")


@dataclass(frozen=True)
class Group:
    """Identical shapes: `len(cells)` copies of one shape, colour and size.

    Attributes:
        shape: One of `SHAPES`.
        colour: One of `COLOURS`.
        size: "small" or "large".
        cells: (row, column) grid cells, row 0 at the top, column 0 on the left.
    """

    shape: str
    colour: str
    size: str
    cells: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        """How many copies the group has."""
        return len(self.cells)

    def kind(self) -> tuple[str, str, str]:
        """(shape, colour, size): two groups of one scene never share a kind."""
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """Groups of shapes on a tinted background.

    Attributes:
        groups: 2-4 groups with distinct kinds and disjoint cells.
        background: Base RGB colour of the background gradient.
    """

    groups: tuple[Group, ...]
    background: tuple[int, int, int]


def _valid(groups: tuple[Group, ...]) -> bool:
    cells = [c for g in groups for c in g.cells]
    kinds = [g.kind() for g in groups]
    return len(set(cells)) == len(cells) and len(set(kinds)) == len(kinds)


def sample_scene(rng: random.Random) -> Scene:
    """Draw a base scene; shapes and colours are often reused so that binding matters."""
    while True:
        n_groups = rng.choice((2, 2, 3, 3, 3, 4))
        free = rng.sample(CELLS, len(CELLS))
        groups: list[Group] = []
        for _ in range(n_groups):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if groups and rng.random() < 0.3:
                shape = rng.choice(groups).shape
            elif groups and rng.random() < 0.3:
                colour = rng.choice(groups).colour
            count = rng.choices((1, 2, 3), weights=(0.7, 0.2, 0.1))[0]
            count = min(count, len(free) - (n_groups - len(groups) - 1))
            cells = tuple(sorted(free.pop() for _ in range(count)))
            groups.append(Group(shape, colour, rng.choice(SIZES), cells))
        if _valid(tuple(groups)):
            return Scene(tuple(groups), _background(rng))


def _background(rng: random.Random) -> tuple[int, int, int]:
    tone = rng.randint(95, 165)
    return tuple(int(np.clip(tone + rng.randint(-18, 18), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def single_object_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None) -> Scene:
    """One shape (of `shape` and `colour`, each drawn when None) in a random cell, at a random
    size, on a background drawn as `sample_scene` draws it: the labelled images of the
    zero-shot tasks (`distill.eval.zeroshot`), never part of the captioned benchmark."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    group = Group(shape, colour, rng.choice(SIZES), (rng.choice(CELLS),))
    return Scene((group,), _background(rng))


def _vary_once(scene: Scene, rng: random.Random, kind: str) -> tuple[Group, ...]:
    gs = list(scene.groups)
    i, j = rng.sample(range(len(gs)), 2)
    a, b = gs[i], gs[j]
    if kind == "swap_colours":
        gs[i], gs[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    elif kind == "swap_positions":
        gs[i], gs[j] = replace(a, cells=b.cells), replace(b, cells=a.cells)
    elif kind == "mirror":
        flip = rng.random() < 0.5
        gs = [
            replace(g, cells=tuple(sorted((2 - r, c) if flip else (r, 2 - c) for r, c in g.cells)))
            for g in gs
        ]
    elif kind == "recount":
        used = {c for g in gs for c in g.cells}
        free = [c for c in CELLS if c not in used]
        if a.count > 1 and (rng.random() < 0.5 or not free):
            gs[i] = replace(a, cells=a.cells[:-1])
        elif free:
            gs[i] = replace(a, cells=tuple(sorted((*a.cells, rng.choice(free)))))
    elif kind == "recolour":
        gs[i] = replace(a, colour=rng.choice([c for c in COLOURS if c != a.colour]))
    elif kind == "reshape":
        gs[i] = replace(a, shape=rng.choice([s for s in SHAPES if s != a.shape]))
    elif kind == "resize":
        gs[i] = replace(a, size="large" if a.size == "small" else "small")
    return tuple(gs)


def vary_scene(scene: Scene, rng: random.Random) -> Scene:
    """A near-duplicate of `scene` that differs in one compositional detail."""
    for _ in range(50):
        groups = _vary_once(scene, rng, rng.choice(VARIANTS))
        if _valid(groups) and sorted(groups, key=repr) != sorted(scene.groups, key=repr):
            return Scene(groups, scene.background)
    return sample_scene(rng)


def _polygon(cx: float, cy: float, radii: list[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    angles = [rot - np.pi / 2 + 2 * np.pi * k / n for k in range(n)]
    return [(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles)]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    rot: float,
    fill: tuple[int, int, int],
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(0.38 * r)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.05] * 4, rot + np.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [r * 1.15] * 3, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45] * 5, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, rot + np.pi / 6), fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r * 1.1), (cx + r * 0.65, cy), (cx, cy + r * 1.1), (cx - r * 0.65, cy)],
            fill=fill,
        )
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, *, image_size: int) -> Image.Image:
    """Draw `scene` at 4x supersampling, reduce to `image_size` and add mild noise."""
    big = 4 * image_size
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    amp = rng.uniform(8, 28, size=3).astype(np.float32)
    bg = np.asarray(scene.background, np.float32) + grad[..., None] * amp
    # Nearest upsampling then a 4x box reduction gives the small gradient back unchanged.
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB").resize(
        (big, big), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    for group in scene.groups:
        for row, col in group.cells:
            cx, cy = (
                (col + 0.5 + rng.uniform(-0.1, 0.1)) * cell,
                (row + 0.5 + rng.uniform(-0.1, 0.1)) * cell,
            )
            r = cell * (0.38 if group.size == "large" else 0.2) * rng.uniform(0.92, 1.05)
            jitter = rng.integers(-12, 13, size=3).tolist()
            fill = tuple(min(255, max(0, v + j)) for v, j in zip(COLOURS[group.colour], jitter))
            _draw_shape(draw, group.shape, cx, cy, r, rng.uniform(-0.25, 0.25), fill)
    small = np.asarray(canvas.reduce(4), np.float32)
    noisy = small + rng.normal(0.0, 4.0, size=small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
