"""Five paraphrased captions per synthetic scene, and the vocabulary they are written in.

Like Flickr30K/MSCOCO annotators, the templates describe the same picture differently: a
full listing, relations ("a red circle to the left of two blue stars"), positions, counts,
shapes without colours, colours without shapes, and subsets of the objects, with synonyms
and varied word order. Captions that mention a subset are ambiguous within a scene family,
so even a perfect model stays below R@1 = 100%.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from distill.data.scenes import COLOURS, Group, Scene

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
"""The committed tokenizer of the synthetic captions (`python -m distill.data.synthetic --write-tokenizer`)."""

SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
    "ring": (("ring", "rings"), ("hoop", "hoops")),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "purple": ("purple", "violet"),
    "brown": ("brown", "chocolate"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = {
    "left": ("to the left of", "left of", "on the left side of"),
    "right": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
CORNER = ("in the {0} {h} corner", "at the {0} {h}", "in the {1} {h} part")
EDGE_V = ("at the {0}", "near the {0}", "in the {1} part")
EDGE_H = ("on the {h}", "on the {h} side", "at the {h}")
CENTRE = ("in the centre", "in the middle", "at the center")
VERTICAL = {0: ("top", "upper"), 2: ("bottom", "lower")}
PREFIXES = (
    "",
    "",
    "a picture of ",
    "an image of ",
    "a photo showing ",
    "we can see ",
    "this shows ",
)
FUNCTION_WORDS = (
    "a an and the of is are there with while which in total shape shapes object objects thing "
    "things including one something plain background exactly some colored other"
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _shape_word(shape: str, count: int, rng: random.Random) -> str:
    singular, plural = rng.choice(SHAPE_WORDS[shape])
    return singular if count == 1 else plural


def noun_phrase(
    g: Group,
    scene: Scene,
    rng: random.Random,
    *,
    colour: bool = True,
    shape: bool = True,
    size: bool | None = None,
) -> str:
    """ "a big red circle", "two tiny violet rings", "a blue shape", ... describing group `g`.

    Attributes left out are added back (size, then colour, then shape) until no other group
    of the scene fits the phrase, so a phrase never names two groups of its own scene.
    """
    said = {"size": rng.random() < 0.5 if size is None else size, "colour": colour, "shape": shape}
    for extra in ("", "size", "colour", "shape"):
        if extra:
            said[extra] = True
        if not any(_same(g, o, said) for o in scene.groups if o is not g):
            break
    words = []
    if said["size"]:
        words.append(rng.choice(SIZE_WORDS[g.size]))
    if said["colour"]:
        words.append(rng.choice(COLOUR_WORDS.get(g.colour, (g.colour,))))
    noun = (
        _shape_word(g.shape, g.count, rng)
        if said["shape"]
        else ("shape" if g.count == 1 else "shapes")
    )
    body = " ".join([*words, noun])
    if g.count == 1:
        return "one " + body if rng.random() < 0.15 else _article(body)
    return f"{NUMBER_WORDS[g.count]} {body}"


def _same(a: Group, b: Group, said: dict[str, bool]) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k, on in said.items() if on)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relations(scene: Scene) -> list[tuple[Group, str, Group]]:
    out = []
    for a in scene.groups:
        for b in scene.groups:
            if a is b:
                continue
            if max(c for _, c in a.cells) < min(c for _, c in b.cells):
                out.append((a, "left", b))
            if max(r for r, _ in a.cells) < min(r for r, _ in b.cells):
                out.append((a, "above", b))
    return out


def _position(g: Group, rng: random.Random) -> str | None:
    rows, cols = {r for r, _ in g.cells}, {c for _, c in g.cells}
    v = VERTICAL[rows.pop()] if len(rows) == 1 and rows <= {0, 2} else None
    h = ("left",) if cols == {0} else ("right",) if cols == {2} else None
    if v and h:
        return rng.choice(CORNER).format(*v, h=h[0])
    if v:
        return rng.choice(EDGE_V).format(*v)
    if h:
        return rng.choice(EDGE_H).format(h=h[0])
    return rng.choice(CENTRE) if g.cells == ((1, 1),) else None


def _full(scene: Scene, rng: random.Random) -> str | None:
    groups = rng.sample(scene.groups, len(scene.groups))
    return rng.choice(PREFIXES) + _join([noun_phrase(g, scene, rng) for g in groups])


def _partial(scene: Scene, rng: random.Random) -> str | None:
    groups = rng.sample(scene.groups, rng.randint(1, max(1, len(scene.groups) - 1)))
    return rng.choice(PREFIXES) + _join(
        [noun_phrase(g, scene, rng, size=rng.random() < 0.7) for g in groups]
    )


def _relation(scene: Scene, rng: random.Random) -> str | None:
    rels = _relations(scene)
    if not rels:
        return None
    a, rel, b = rng.choice(rels)
    if rng.random() < 0.5:
        a, rel, b = b, INVERSE[rel], a
    verb = rng.choice(("", "", "is " if a.count == 1 else "are "))
    return f"{noun_phrase(a, scene, rng)} {verb}{rng.choice(RELATIONS[rel])} {noun_phrase(b, scene, rng)}"


def _double_relation(scene: Scene, rng: random.Random) -> str | None:
    rels = _relations(scene) + [(b, INVERSE[r], a) for a, r, b in _relations(scene)]
    rng.shuffle(rels)
    for a, r1, b in rels:
        for a2, r2, c in rels:
            if a2 is a and c is not b:
                first = f"{noun_phrase(a, scene, rng)} {rng.choice(RELATIONS[r1])} {noun_phrase(b, scene, rng)}"
                return f"{first} and {rng.choice(RELATIONS[r2])} {noun_phrase(c, scene, rng, size=False)}"
    return None


def _located(scene: Scene, rng: random.Random) -> str | None:
    parts = [
        (g, p) for g in rng.sample(scene.groups, len(scene.groups)) if (p := _position(g, rng))
    ]
    if not parts:
        return None
    said = []
    for g, p in parts[: rng.randint(1, 2)]:
        verb = rng.choice(("", "is " if g.count == 1 else "are "))
        said.append(f"{noun_phrase(g, scene, rng)} {verb}{p}")
    return " and ".join(said) if rng.random() < 0.5 else ", while ".join(said)


def _count(scene: Scene, rng: random.Random) -> str | None:
    total = sum(g.count for g in scene.groups)
    g = max(scene.groups, key=lambda x: (x.count, rng.random()))
    noun = rng.choice(("shape", "object", "thing"))
    if rng.random() < 0.5:
        return f"{NUMBER_WORDS[total]} {noun}s in total, including {noun_phrase(g, scene, rng)}"
    verb, rest = "is" if g.count == 1 else "are", total - g.count
    other = f"{NUMBER_WORDS[rest]} other {noun}{'s' if rest > 1 else ''}"
    return f"there {verb} exactly {noun_phrase(g, scene, rng, size=False)} and {other}"


def _shapes_only(scene: Scene, rng: random.Random) -> str | None:
    groups = rng.sample(scene.groups, len(scene.groups))
    listing = _join([noun_phrase(g, scene, rng, colour=False, size=False) for g in groups])
    return listing + rng.choice(("", " on a plain background", " with some colored shapes"))


def _colours_only(scene: Scene, rng: random.Random) -> str | None:
    rels = _relations(scene)
    if not rels:
        return None
    a, rel, b = rng.choice(rels)
    pa, pb = (noun_phrase(g, scene, rng, shape=False, size=False) for g in (a, b))
    return f"{pa} {rng.choice(RELATIONS[rel])} {pb}"


TEMPLATES: tuple[Callable[[Scene, random.Random], str | None], ...] = (
    _partial,
    _double_relation,
    _located,
    _count,
    _shapes_only,
    _colours_only,
    _relation,
)


def _finish(text: str, rng: random.Random) -> str:
    text = text.strip()
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.5 else "")


def make_captions(scene: Scene, rng: random.Random, *, n: int = 5) -> list[str]:
    """`n` distinct captions: a full listing, a relation (or position), then other templates."""
    first = [_full(scene, rng), _relation(scene, rng) or _located(scene, rng) or _count(scene, rng)]
    out = [c for c in first if c]
    for _ in range(100):
        if len(out) >= n:
            break
        text = rng.choice(TEMPLATES)(scene, rng)
        if text and text not in out:
            out.append(text)
    while len(out) < n:  # tiny scenes can exhaust the distinct phrasings
        out.append(_full(scene, rng) or "")
    rng.shuffle(out)
    return [_finish(c, rng) for c in out[:n]]


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted."""
    texts = [FUNCTION_WORDS, *NUMBER_WORDS, *PREFIXES, *CORNER, *EDGE_V, *EDGE_H, *CENTRE]
    texts += [w for pair in SHAPE_WORDS.values() for sp in pair for w in sp]
    texts += [w for ws in COLOUR_WORDS.values() for w in ws] + list(COLOURS)
    texts += [w for ws in SIZE_WORDS.values() for w in ws] + [
        w for ws in RELATIONS.values() for w in ws
    ]
    texts += [w for ws in VERTICAL.values() for w in ws] + ["left", "right"]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t) if w != "h"})


def words(text: str) -> list[str]:
    """Lowercase word tokens of a caption (the Karpathy JSON `tokens`)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def write_tokenizer(folder: str | Path = TOKENIZER_DIR) -> Path:
    """Write a lowercase BERT WordPiece tokenizer covering the caption grammar into `folder`.

    The vocabulary holds the special tokens ([PAD] = 0), punctuation, digits, single letters
    and their `##` continuations (so no lowercase word maps to [UNK]) and every grammar word.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alnum = "0123456789abcdefghijklmnopqrstuvwxyz"
    chars = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list(alnum)
    grammar = [w for w in vocabulary() if w not in chars]
    tokens = specials + chars + grammar + [f"##{c}" for c in alnum]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials))
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 64,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        **names,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(names, indent=2) + "\n", encoding="utf-8"
    )
    return folder
