"""Writing the teacher-output cache (see `distill.training.cache.store`): `fill_cache`
behind `distill cache`, per-rank parts, then one merge.

Each rank streams its share of the training images (split by rank, then by loader worker,
as in training), encodes every image once and every caption, and appends fp16 rows to
`parts/<output>.rank<r>.f16` with the keys in `parts/<output>.rank<r>.keys.npy`; a non-finite
row (an fp16 overflow, a broken teacher) is refused, so any NaN read later is damage. Rank
0 then sorts all keys and writes `<output>.npy` / `<output>.keys.npy` in that order,
gathering rows chunk by chunk from the memory-mapped parts, so the merge holds the key
table (fixed-width bytes, about 11 bytes per sample) but never the rows, and
records each file's size and sha256 in `meta.json` (one more read of the files just
written, from the page cache: about 1 s per GB).

An entry whose fingerprint matches is complete unless an output is missing or fails
`check_entry` (then only those are rebuilt); `force=True` (`distill cache --force`)
rebuilds every output of the entry. Data or weights that changed give another fingerprint,
hence another folder, and the old entry never matches again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from distill.augment import AugmentSpec
from distill.config.schema import Config
from distill.data.base import open_dataset
from distill.data.loading import Collator
from distill.distributed import barrier, join_launch_group, local_rank
from distill.errors import ConfigError
from distill.io import atomic_path, write_json
from distill.models.base import Encoder
from distill.training.cache.arrays import array_record
from distill.training.cache.encode import encode_part
from distill.training.cache.fingerprint import (
    CACHEABLE,
    Fingerprint,
    cache_plan,
    data_files,
    fingerprint,
    load_frozen,
)
from distill.training.cache.shards import build_shards, shard_done
from distill.training.cache.store import check_entry, entries

MERGE_ROWS = 65536


def merge_parts(parts: Path, outputs: list[str], world: int, folder: Path) -> dict[str, dict[str, Any]]:
    """Merge every rank's part into sorted `<output>.npy` + `<output>.keys.npy` under `folder`.

    Returns:
        Output -> {"rows": N, "dim": D}.

    Raises:
        ValueError: If a key occurs twice (two samples of the split share a key).
    """
    shapes = {}
    for output in outputs:
        names = [np.load(parts / f"{output}.rank{r}.keys.npy") for r in range(world)]
        raw = [np.memmap(f, dtype=np.float16, mode="r") if (f := parts / f"{output}.rank{r}.f16").stat().st_size
               else np.zeros(0, dtype=np.float16) for r in range(world)]  # mapped: rows are gathered chunk by chunk
        n = sum(len(k) for k in names)
        dim = next((len(v) // len(k) for k, v in zip(names, raw) if len(k)), 0)
        rows = [v.reshape(len(k), dim) for k, v in zip(names, raw)]
        width = max([k.dtype.itemsize for k in names if len(k)] or [1])
        keys = np.concatenate([k.astype(f"S{width}") for k in names])  # fixed-width bytes: no Python strings
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if n > 1 and (keys[1:] == keys[:-1]).any():
            raise ValueError(f"{output}: duplicate sample key {keys[1:][keys[1:] == keys[:-1]][0]!r} in the training split")
        offsets = np.cumsum([0, *[len(k) for k in names]])
        with atomic_path(folder / f"{output}.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
            for start in range(0, n, MERGE_ROWS):
                idx = order[start : start + MERGE_ROWS]
                part = np.searchsorted(offsets[1:], idx, side="right")
                for p in np.unique(part):
                    sel = part == p
                    out[start + np.flatnonzero(sel)] = rows[p][idx[sel] - offsets[p]]
            out.flush()
            del out
        with atomic_path(folder / f"{output}.keys.npy") as tmp:
            np.save(tmp, keys)
        shapes[output] = {"rows": int(n), "dim": int(dim)}
    return shapes


def same_on_every_rank(value: str, what: str) -> None:
    """Raise on every rank (no hang) unless every rank of the group computed this `value`.

    Raises:
        ConfigError: If the ranks disagree, e.g. node-local copies of the data whose mtimes differ.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ConfigError(
            f"{what}: the ranks see different fingerprints ({len(set(values))} kinds): every rank must read "
            "the same teacher and data files (node-local copies must keep sizes and mtimes: rsync -a, cp -p)"
        )


def fill_cache(
    config: Config, *, device: str = "cpu", batch_size: int | None = None, force: bool = False
) -> dict[str, Path]:
    """`distill cache`: compute and store every needed teacher node that has no intact entry yet.

    Under torchrun (WORLD_SIZE > 1) every rank encodes its share (`device="cuda"` means
    the rank's own GPU, `cuda:LOCAL_RANK`); rank 0 merges.

    Args:
        config: The experiment.
        device: Where the teachers run.
        batch_size: Images per batch (default `data.eval_batch_size`).
        force: Rebuild every output of a matching entry, even an intact one.

    Returns:
        Model name -> its cache entry.
    """
    rank, world = join_launch_group()
    if device == "cuda" and world > 1:  # one GPU per process, as torchrun numbers them
        device = f"cuda:{local_rank()}"
    plan = cache_plan(config)
    if not plan:
        raise ConfigError("edges: no enabled edge reads an image or text node of a frozen model: nothing to cache")
    open_dataset(config.data.dataset, config.data.args).prepare()  # the files exist before they are signed
    files = data_files(config)
    done: dict[str, Path] = {}
    for name, outputs in plan.items():
        model = load_frozen(config, name)
        fp = fingerprint(config, name, model, files)
        same_on_every_rank(fp.digest(), f"models.{name}")
        folder = Path(config.cache.dir).expanduser() / fp.digest()[:20]
        meta = entries(config.cache.dir).get(folder, {})
        held = [o for o in meta.get("outputs", {}) if o in CACHEABLE]
        if config.cache.layout == "shards" and (force or not set(outputs) <= set(held) or check_entry(folder, meta, outputs)):
            # shard by shard: finished shards are kept (resumes), the rest are built
            wanted = list(dict.fromkeys([*outputs, *held])) if meta.get("layout") == "shards" else outputs
            fill_sharded(config, name, model.to(device), fp, folder, wanted, rank, world, batch_size, force)
            done[name] = folder
            continue
        if force:
            todo = list(dict.fromkeys([*outputs, *held]))
        else:
            todo = [o for o in outputs if o not in held or check_entry(folder, meta, [o])]
        if todo:
            start = time.perf_counter()
            barrier()  # every rank has read meta.json
            if rank == 0 and set(todo) & set(held):  # rewriting arrays it lists: incomplete until rewritten
                (folder / "meta.json").unlink(missing_ok=True)
            parts = folder / "parts"
            source = text_source(config, fp, folder) if "text" in todo else None
            encoded = [o for o in todo if not (o == "text" and source is not None)]
            if encoded:
                encode_part(config, model.to(device), encoded, parts, rank=rank, world=world, batch_size=batch_size,
                            name=name)
            barrier()
            if rank == 0:
                shapes = with_views(merge_parts(parts, encoded, world, folder), config, fp)
                if source is not None:
                    shapes["text"] = link_text(source, folder)
                kept = [o for o in held if o not in todo]
                arrays = {k: v for o in kept for k, v in meta.get("arrays", {}).items() if k.startswith(f"{o}.")}
                unsigned = [o for o in kept if f"{o}.npy" not in arrays]  # built by an older distill
                meta = {
                    **entry_meta(config, name, fp),
                    "outputs": {**{o: meta["outputs"][o] for o in kept}, **shapes}, "dtype": "float16",
                    "arrays": {**arrays, **array_record(folder, [*unsigned, *todo])},
                    "seconds": round(time.perf_counter() - start, 2),
                }
                write_json(folder / "meta.json", meta, default=str)  # last: the entry is complete
                shutil.rmtree(parts, ignore_errors=True)
            barrier()
        done[name] = folder
        del model
    return done


def entry_meta(config: Config, name: str, fp: Fingerprint) -> dict[str, Any]:
    """What every entry's `meta.json` records of its origin (fingerprint, model, data, views)."""
    spec = config.models[name]
    return {
        "fingerprint": fp.digest(), "parts": fp.parts(), "files": fp.files,
        "model": {"name": name, "type": spec.type, "args": dict(spec.args), "precision": spec.precision},
        "dataset": {"name": config.data.dataset, "args": dict(config.data.args)},
        **({"augment": fp.settings} if fp.settings else {}),
    }


def with_views(shapes: dict[str, dict[str, int]], config: Config, fp: Fingerprint) -> dict[str, dict[str, int]]:
    """`shapes` with the image output's width split into V views of D (`{"dim": D, "views": V}`)."""
    spec = AugmentSpec.from_config(config.data.augment)
    if "image" not in shapes or not fp.settings or spec is None or not spec.views:
        return shapes
    return {**shapes, "image": {**shapes["image"], "dim": shapes["image"]["dim"] // spec.views, "views": spec.views}}


def fill_sharded(
    config: Config, name: str, model: Encoder, fp: Fingerprint, folder: Path, outputs: list[str],
    rank: int, world: int, batch_size: int | None, force: bool,
) -> None:
    """`cache.layout: shards`: every rank builds its unfinished shards, then rank 0 writes
    `meta.json` from the shards' `done.json` (`distill.training.cache.shards`).

    Raises:
        ConfigError: If the training data is not sharded.
    """
    dataset = open_dataset(config.data.dataset, config.data.args)
    urls = dataset.shards("train")
    if not urls:
        raise ConfigError(f"cache.layout: shards needs sharded training data (webdataset); data.dataset "
                          f"{config.data.dataset!r} is not sharded here; use cache.layout=global")
    start = time.perf_counter()
    barrier()
    if rank == 0:
        (folder / "meta.json").unlink(missing_ok=True)  # incomplete until every shard is
    collator = Collator({"m": (model.image_preprocess() if "image" in outputs else None,
                               model.text_preprocess() if "text" in outputs else None)},
                        AugmentSpec.from_config(config.data.augment))
    build_shards(dataset, model, outputs, folder, collator, rank=rank, world=world,
                 batch_size=batch_size or config.data.eval_batch_size, num_workers=config.data.num_workers,
                 name=name, force=force)
    barrier()
    if rank == 0:
        shapes: dict[str, dict[str, int]] = {}
        for url in urls:
            record = shard_done(folder, url)
            if record is None or set(record["outputs"]) != set(outputs):
                raise ConfigError(f"cache.dir: shard {url} was not built (see the errors of the rank that took it)")
            for output, spec in record["outputs"].items():
                total = shapes.setdefault(output, {"rows": 0, "dim": 0})
                total["rows"] += spec["rows"]
                total["dim"] = total["dim"] or spec["width"]
        meta = {**entry_meta(config, name, fp), "layout": "shards", "shards": urls,
                "outputs": with_views(shapes, config, fp), "dtype": "float16",
                "seconds": round(time.perf_counter() - start, 2)}
        write_json(folder / "meta.json", meta, default=str)  # last: the entry is complete
    barrier()


def text_source(config: Config, fp: Fingerprint, folder: Path) -> Path | None:
    """An intact global-layout entry whose text rows this one can share: the same fingerprint
    but for the augmentation (text rows do not depend on the views), e.g. the entry of
    another `data.augment.views`; None when there is none."""
    if not fp.augment and not any(m.get("parts", {}).get("augment") for m in entries(config.cache.dir).values()):
        return None
    same = {k: v for k, v in fp.parts().items() if k != "augment"}
    for other, meta in entries(config.cache.dir).items():
        parts = {k: v for k, v in meta.get("parts", {}).items() if k != "augment"}
        if other != folder and parts == same and meta.get("layout", "global") == "global" \
                and "text" in meta.get("outputs", {}) and not check_entry(other, meta, ["text"]):
            return other
    return None


def link_text(source: Path, folder: Path) -> dict[str, int]:
    """Hard-link (or copy, across file systems) `source`'s text arrays into `folder`; their shape."""
    for name in ("text.npy", "text.keys.npy"):
        target = folder / name
        target.unlink(missing_ok=True)
        try:
            os.link(source / name, target)
        except OSError:
            shutil.copyfile(source / name, target)
    return dict(json.loads((source / "meta.json").read_text())["outputs"]["text"])
