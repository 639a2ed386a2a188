"""Zero-shot classification, the second evaluation task (CLIP_benchmark's protocol).

For each class, every template (`"a photo of a {c}."`) is filled with the class name and
encoded by the text tower; the embeddings are L2-normalised, averaged over the templates
and normalised again: the class's zero-shot weight. Images are encoded by the image tower
and normalised; logits = images @ weightsᵀ. Metrics, in percent like the retrieval recalls:

* top-1 and top-5 accuracy (top-k with k capped at the number of classes);
* mean per-class recall (balanced accuracy), over the classes that have images.

Ties are broken towards the lower class index, deterministically: the rank of the true
class is the number of classes scoring higher plus those scoring the same with a lower
index, and the prediction is the first maximum, so top-1 equals the prediction's accuracy.

A task is an image folder (`FOLDER/<class>/*.jpg|png`, classes in sorted folder order) or
one of the embedded benchmark's labelled tasks (`embedded:shape`, `embedded:colour`,
`embedded:count`; `docs/zeroshot.md` says how each is built), whose class names and
templates come from the caption grammar the models are trained on (`distill.data.captions`).
"""

from __future__ import annotations

import difflib
import io
import json
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.config.schema import DataConfig
from distill.data.base import open_rgb, require_path
from distill.data.captions import NUMBER_WORDS, PREFIXES, SHAPE_WORDS
from distill.data.scenes import CELLS, COLOURS, SHAPES, render_scene, single_object_scene
from distill.data.synthetic import VERSION, SyntheticShapes, make_example, make_scene
from distill.errors import ConfigError
from distill.io import write_json
from distill.models.base import Encoder, ImagePreprocess

TOP_K = 5
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)
"""Image folders' default: "a photo of a {c}." and the 7-template ensemble of OpenAI's CLIP
ImageNet prompt-engineering notebook, verbatim."""

EMBEDDED = "embedded:"
PER_CLASS = 50
"""Images per class of the single-object sets (`embedded:shape`, `embedded:colour`)."""
_SHAPE_NAMES = tuple(SHAPE_WORDS[s][0][0] for s in SHAPES)  # the first word of each shape
EMBEDDED_TASKS: dict[str, dict[str, Any]] = {
    "shape": {
        "keys": SHAPES, "names": _SHAPE_NAMES,
        # every shape word starts with a consonant: "a"; the caption prefixes of the grammar
        "templates": ("a {c}", "one {c}", *(f"{p}a {{c}}" for p in dict.fromkeys(PREFIXES) if p)),
        "about": f"the shape of a single-object scene ({PER_CLASS} images per shape)",
    },
    "colour": {
        "keys": tuple(COLOURS), "names": tuple(COLOURS),
        # "one" fits every colour ("an orange", "a red"); averaged over the shape nouns
        "templates": ("one {c} shape", *(f"one {{c}} {s}" for s in _SHAPE_NAMES)),
        "about": f"the colour of a single-object scene ({PER_CLASS} images per colour)",
    },
    "count": {
        "keys": tuple(str(n) for n in range(2, len(CELLS) + 1)),
        "names": tuple(NUMBER_WORDS[n] for n in range(2, len(CELLS) + 1)),
        "templates": tuple(f"{{c}} {noun}s in total" for noun in ("shape", "object", "thing")),  # the count captions
        "about": "the number of shapes in each scene of the benchmark's test split",
    },
}  # fmt: skip
"""The embedded benchmark's labelled tasks: class keys (labels), names and templates."""


@dataclass(frozen=True)
class ZeroShotTask:
    """A labelled image set and how to name its classes.

    Attributes:
        name: `embedded:<task>` or the image folder.
        classes: Class names in label order.
        templates: Prompts with `{c}` where the class name goes.
        labels: The class index of each image.
        images: One zero-argument loader per image (a PIL image, or raises on a bad file).
        source: How the set was built, one line.
    """

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    labels: tuple[int, ...]
    images: tuple[Callable[[], Image.Image], ...] = field(repr=False)
    source: str = ""


def zeroshot_weights(class_text: Tensor) -> Tensor:
    """(C, T, D) template embeddings per class -> (C, D) zero-shot weights: each embedding
    L2-normalised, the mean over the T templates normalised again (float32)."""
    if class_text.ndim != 3 or 0 in class_text.shape:
        raise ValueError(f"expected (classes, templates, dim) embeddings, got shape {tuple(class_text.shape)}")
    unit = torch.nn.functional.normalize(class_text.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, Any]:
    """Top-1, top-5 (k = min(5, classes)) and mean per-class recall, in percent.

    Args:
        logits: (N, C) scores of N images for C classes.
        labels: (N,) true class of each image.

    Returns:
        `top1`, `top5`, `top5_k` (the k used), `mean_per_class_recall` (over the classes
        with images), `per_class_recall` (C entries, None for a class without images),
        `per_class_images`, `n_images`, `n_classes`.

    Raises:
        ValueError: On bad shapes, labels outside 0..C-1 or non-finite logits.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"expected (N, C) logits and (N,) labels, N, C >= 1; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    n, c = logits.shape
    labels = labels.long().to(logits.device)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must be in 0..{c - 1}, got {int(labels.min())}..{int(labels.max())}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold NaN or infinite values")
    logits = logits.float()
    true = logits.gather(1, labels[:, None])
    before = torch.arange(c, device=logits.device)[None, :] < labels[:, None]
    rank = (logits > true).sum(1) + ((logits == true) & before).sum(1)
    pred = logits.argmax(1)  # the first maximum: ties go to the lower index, as in `rank`
    k = min(TOP_K, c)
    counts = torch.bincount(labels, minlength=c)
    hits = torch.bincount(labels[pred == labels], minlength=c)
    recall = [100.0 * int(h) / int(m) if m else None for h, m in zip(hits, counts)]
    seen = [r for r in recall if r is not None]
    return {
        "top1": 100.0 * int((rank < 1).sum()) / n,
        "top5": 100.0 * int((rank < k).sum()) / n,
        "top5_k": k,
        "mean_per_class_recall": sum(seen) / len(seen),
        "per_class_recall": recall,
        "per_class_images": [int(m) for m in counts],
        "n_images": n,
        "n_classes": c,
    }


def read_templates(path: str | Path) -> tuple[str, ...]:
    """The templates of a file, one per line with `{c}` (blank lines skipped).

    Raises:
        ConfigError: A missing or empty file, or lines without `{c}` (one problem each).
    """
    file = require_path(path, "--templates")
    lines = [(i, line.strip()) for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line]
    if not lines:
        raise ConfigError(f"--templates: {file} holds no template (one per line, with {{c}} for the class name)")
    bad = [f"--templates: {file} line {i}: {line!r} has no {{c}} (where the class name goes)"
           for i, line in lines if "{c}" not in line]  # fmt: skip
    if bad:
        raise ConfigError(bad)
    return tuple(line for _, line in lines)


def read_classnames(path: str | Path, keys: Sequence[str], what: str) -> tuple[str, ...]:
    """Class names for `keys` from a file: one name per line in `keys` order, or a JSON
    object {key: name} covering every key.

    Raises:
        ConfigError: A missing file, a wrong count, unknown or missing keys, duplicate names.
    """
    file = require_path(path, "--classnames")
    text = file.read_text(encoding="utf-8")
    where = f"--classnames: {file}"
    if file.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise ConfigError(f"{where}: expected a JSON object {{class: name}} of non-empty strings")
        problems, suggested = [], set()
        missing = [k for k in keys if k not in mapping]
        for key in [k for k in mapping if k not in keys]:
            close = difflib.get_close_matches(key, missing, n=1)
            suggested.update(close)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: {key!r} is not one of the {len(keys)} {what}{hint}")
        missing = [k for k in missing if k not in suggested]  # a typo is one problem, not two
        if missing:
            problems.append(f"{where}: no name for {len(missing)} of the {what}: {', '.join(map(repr, missing[:5]))}"
                            + (", ..." if len(missing) > 5 else ""))  # fmt: skip
        if problems:
            raise ConfigError(problems)
        names = [mapping[k].strip() for k in keys]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != len(keys):
            raise ConfigError(f"{where}: {len(names)} names for {len(keys)} {what} ({', '.join(keys[:3])}"
                              f"{', ...' if len(keys) > 3 else ''}); one name per line, in that order")  # fmt: skip
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: duplicate class names {dupes} (their classes could not be told apart)")
    return tuple(names)


def _gather(problems: list[str], read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ConfigError as e:
        problems += e.problems
        return None


def folder_task(folder: str | Path, *, classnames: str | None = None, templates: str | None = None) -> ZeroShotTask:
    """An ImageFolder: every sub-folder is a class (sorted by name; default name: the folder
    name with `_` as spaces) holding its images, recursively.

    Raises:
        ConfigError: Every problem of the folder and the files at once.
    """
    root = require_path(folder, "--data", kind="folder")
    problems: list[str] = []
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(dirs) < 2:
        problems.append(f"--data: {root} has {len(dirs)} class folder(s); zero-shot classification needs at least 2 "
                        "(FOLDER/<class>/*.jpg|png)")  # fmt: skip
    files: list[list[Path]] = []
    for d in dirs:
        found = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(d).parts))  # fmt: skip
        if not found:
            problems.append(f"--data: class folder {d} holds no image ({', '.join(IMAGE_EXTS)})")
        files.append(found)
    keys = [d.name for d in dirs]
    names = _gather(problems, lambda: read_classnames(classnames, keys, f"class folders of {root}")) if classnames else None
    prompts = _gather(problems, lambda: read_templates(templates)) if templates else DEFAULT_TEMPLATES
    if problems:
        raise ConfigError(problems)
    return ZeroShotTask(
        name=str(folder), classes=names or tuple(k.replace("_", " ") for k in keys), templates=prompts,
        labels=tuple(i for i, found in enumerate(files) for _ in found),
        images=tuple(partial(open_rgb, p) for found in files for p in found),
        source=f"image folder {root}: {sum(map(len, files))} images in {len(dirs)} class folders",
    )  # fmt: skip


def _jpeg(image: Image.Image) -> Image.Image:
    """Through JPEG (quality 92) and back, as every benchmark image is stored."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return open_rgb(buf.getvalue())


def _single_object(task: str, index: int, image_size: int) -> Image.Image:
    keys = EMBEDDED_TASKS[task]["keys"]
    wanted = {task: keys[index % len(keys)]}  # classes in turn: a balanced set
    scene = single_object_scene(random.Random(f"{VERSION}/zeroshot/{task}/{index}"), **wanted)
    pixels = np.random.default_rng([VERSION, 1_000_003, list(EMBEDDED_TASKS).index(task), index])
    return _jpeg(render_scene(scene, pixels, image_size=image_size))


def _test_image(seed: int, index: int, image_size: int) -> Image.Image:
    return open_rgb(make_example(seed=seed, split="test", index=index, image_size=image_size)[0])


def embedded_task(which: str, data: DataConfig | None = None, *, classnames: str | None = None,
                  templates: str | None = None) -> ZeroShotTask:  # fmt: skip
    """A labelled task of the embedded benchmark (see `EMBEDDED_TASKS`), at the benchmark
    settings (seed, test size, image size) of `data` when its dataset is `synthetic`, else
    at the defaults of `distill.data.synthetic.SyntheticShapes`.

    Raises:
        ConfigError: An unknown task, or problems of the class-names or templates file.
    """
    if which not in EMBEDDED_TASKS:
        close = difflib.get_close_matches(which, EMBEDDED_TASKS, n=1)
        hint = f"; did you mean {EMBEDDED}{close[0]}?" if close else ""
        raise ConfigError(f"--data: unknown embedded task {EMBEDDED}{which}; tasks: "
                          f"{', '.join(EMBEDDED + t for t in EMBEDDED_TASKS)}{hint}")  # fmt: skip
    spec = EMBEDDED_TASKS[which]
    problems: list[str] = []
    names = _gather(problems, lambda: read_classnames(classnames, spec["keys"], f"{which} classes")) if classnames else None
    prompts = _gather(problems, lambda: read_templates(templates)) if templates else spec["templates"]
    if problems:
        raise ConfigError(problems)
    synthetic = data is not None and data.dataset == "synthetic"
    bench = SyntheticShapes(**dict(data.args)) if synthetic else SyntheticShapes()  # type: ignore[union-attr]
    settings = f"seed {bench.seed}, {bench.image_size}px" + ("" if synthetic else " (defaults: the config's data is not synthetic)")
    if which == "count":
        n = bench.sizes[2]
        labels = tuple(spec["keys"].index(str(sum(g.count for g in make_scene(seed=bench.seed, split="test", index=i).groups)))
                       for i in range(n))  # fmt: skip
        images = tuple(partial(_test_image, bench.seed, i, bench.image_size) for i in range(n))
        source = f"the embedded benchmark's test split ({n} scenes, {settings}), labelled by its scenes' shape count"
    else:
        n = PER_CLASS * len(spec["keys"])
        labels = tuple(i % len(spec["keys"]) for i in range(n))
        images = tuple(partial(_single_object, which, i, bench.image_size) for i in range(n))
        source = f"{n} single-object scenes, {PER_CLASS} per {which} ({bench.image_size}px), apart from every split"
    return ZeroShotTask(name=EMBEDDED + which, classes=names or spec["names"], templates=prompts, labels=labels,
                        images=images, source=source)  # fmt: skip


def open_task(data: str, config: DataConfig | None = None, *, classnames: str | None = None,
              templates: str | None = None) -> ZeroShotTask:  # fmt: skip
    """`embedded:<task>` (`embedded_task`) or an image folder (`folder_task`)."""
    if data.startswith(EMBEDDED):
        return embedded_task(data.removeprefix(EMBEDDED), config, classnames=classnames, templates=templates)
    return folder_task(data, classnames=classnames, templates=templates)


class _Pixels(Dataset):
    """(pixels or None for an unreadable image, index) of each image of a task."""

    def __init__(self, task: ZeroShotTask, preprocess: ImagePreprocess) -> None:
        self.task, self.preprocess = task, preprocess

    def __len__(self) -> int:
        return len(self.task.images)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        try:
            return self.preprocess(self.task.images[i]()), i
        except (OSError, ValueError):  # undecodable: skipped and counted, as in training
            return None, i


def _collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, Tensor, int]:
    kept = [(x, i) for x, i in items if x is not None]
    pixels = torch.stack([x for x, _ in kept]) if kept else None
    return pixels, torch.tensor([i for _, i in kept], dtype=torch.long), len(items) - len(kept)


def class_weights(encoder: Encoder, classes: Sequence[str], templates: Sequence[str], *, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> Tensor:  # fmt: skip
    """(C, D) zero-shot weights: every template filled with every class name, encoded,
    then `zeroshot_weights`. The encoder must be on `device`, in eval mode."""
    prompts = [t.replace("{c}", c) for c in classes for t in templates]
    tokenize = encoder.text_preprocess()
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start:start + batch_size])
        out.append(encoder.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float())
    return zeroshot_weights(torch.cat(out).view(len(classes), len(templates), -1))


def evaluate_zeroshot(encoder: Encoder, name: str, task: ZeroShotTask, *, batch_size: int = 128, num_workers: int = 0,
                      device: str | torch.device = "cpu") -> dict[str, Any]:  # fmt: skip
    """Encode the task's images and prompts with one model and score the classification.

    Returns:
        `classification_metrics` (per-class entries keyed by class name) plus `task`,
        `model`, `classes`, `templates`, `skipped` (unreadable images) and `source`.

    Raises:
        ConfigError: If no image of the task could be read.
    """
    preprocess = encoder.image_preprocess()
    if preprocess is None or encoder.text_preprocess() is None:
        raise ConfigError(f"--model: {name!r} does not encode both images and text; zero-shot needs both towers")
    encoder = encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(_Pixels(task, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)  # fmt: skip
    images, index, skipped = [], [], 0
    try:
        with torch.no_grad():
            weights = class_weights(encoder, task.classes, task.templates, device=device)
            bar = tqdm(loader, desc=f"zero-shot {name}", unit="batch", disable=not sys.stderr.isatty())
            for pixels, ids, bad in bar:
                skipped += bad
                if pixels is not None:
                    images.append(torch.nn.functional.normalize(encoder.encode_image(pixels.to(device)).float(), dim=-1))
                    index.append(ids)
    finally:
        encoder.train(was_training)
    if not images:
        raise ConfigError(f"--data: {task.name}: none of its {len(task.images)} images could be read")
    labels = torch.tensor(task.labels, dtype=torch.long)[torch.cat(index)]
    metrics = classification_metrics(torch.cat(images) @ weights.T, labels)
    for key in ("per_class_recall", "per_class_images"):
        metrics[key] = dict(zip(task.classes, metrics[key]))
    return {"task": task.name, "model": name, **metrics, "skipped": skipped, "classes": list(task.classes),
            "templates": list(task.templates), "source": task.source}  # fmt: skip


def result_filename(task: str) -> str:
    """`zeroshot_<task>.json`: `embedded:shape` -> `zeroshot_embedded_shape.json`, a folder by its name."""
    slug = task.replace(":", "_") if task.startswith(EMBEDDED) else Path(task).resolve().name
    return f"zeroshot_{re.sub(r'[^A-Za-z0-9_.-]', '_', slug)}.json"


def save_zeroshot(folder: str | Path, result: Mapping[str, Any]) -> Path:
    """Write `zeroshot_<task>.json` into `folder` atomically; returns its path."""
    return write_json(Path(folder) / result_filename(result["task"]), dict(result))


def format_zeroshot(result: Mapping[str, Any]) -> str:
    """The summary lines and the per-class recall table, for the terminal."""
    skipped = f", {result['skipped']} unreadable images skipped" if result["skipped"] else ""
    width = max(len("class"), *(len(c) for c in result["classes"]))
    lines = [f"zero-shot {result['task']}: {result['model']}, {result['n_images']} images, {result['n_classes']} "
             f"classes, {len(result['templates'])} templates{skipped}",
             f"{'top1':<22} {result['top1']:8.2f}", f"{'top' + str(result['top5_k']):<22} {result['top5']:8.2f}",
             f"{'mean_per_class_recall':<22} {result['mean_per_class_recall']:8.2f}", "",
             f"{'class':<{width}}   recall  images"]  # fmt: skip
    for name in result["classes"]:
        recall = result["per_class_recall"][name]
        shown = "     n/a" if recall is None else f"{recall:8.2f}"
        lines.append(f"{name:<{width}} {shown} {result['per_class_images'][name]:7d}")
    return "\n".join(lines)
