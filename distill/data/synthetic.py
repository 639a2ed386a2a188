"""The embedded benchmark: procedurally generated captioned images of coloured shapes.

Everything follows from a seed: the same seed gives byte-identical images and captions.
The data is written to disk once, in the same two layouts as real data, and then read by
the ordinary readers:

- `{root}/{split}/{00000..N}.tar`: webdataset shards in the img2dataset layout
  (`{key}.jpg`, `{key}.txt` = first caption, `{key}.json` with all five captions);
- `{root}/dataset_synthetic.json` + `{root}/images/{key}.jpg`: a Karpathy-split JSON.

`python -m distill.data.synthetic --write-tokenizer` rebuilds `distill/assets/tokenizer`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from distill.data.base import CaptionDataset, Part
from distill.data.captions import TOKENIZER_DIR, make_captions, words, write_tokenizer
from distill.data.karpathy import KarpathySplits
from distill.data.scenes import Scene, render_scene, sample_scene, vary_scene
from distill.data.webdataset import WebDatasetShards
from distill.errors import ConfigError
from distill.io import write_bytes
from distill.registry import DATASETS

VERSION = 1  # bump when the generator changes, so that old caches are not reused
SPLITS = ("train", "val", "test")
SHARD_SIZE = 1000
FAMILY_SIZE = 4  # a base scene and three near-duplicate variants, always in one split
CAPTIONS_PER_IMAGE = 5
DONE = "_DONE"


def make_scene(*, seed: int, split: str, index: int) -> Scene:
    """The scene of image `index` of `split` (its shapes, colours, sizes, counts and cells):
    the metadata the files do not keep, recomputed exactly (`distill.eval.zeroshot` labels
    the test split with it)."""
    family = random.Random(f"{VERSION}/{seed}/{split}/family/{index // FAMILY_SIZE}")
    scene = sample_scene(family)
    if index % FAMILY_SIZE:
        scene = vary_scene(scene, random.Random(f"{VERSION}/{seed}/{split}/variant/{index}"))
    return scene


def make_example(*, seed: int, split: str, index: int, image_size: int) -> tuple[bytes, list[str]]:
    """JPEG bytes and five captions of image `index` of `split`; a pure function of its arguments."""
    scene = make_scene(seed=seed, split=split, index=index)
    captions = make_captions(
        scene, random.Random(f"{VERSION}/{seed}/{split}/captions/{index}"), n=CAPTIONS_PER_IMAGE
    )
    pixels = np.random.default_rng([VERSION, seed, SPLITS.index(split), index])
    buf = io.BytesIO()
    render_scene(scene, pixels, image_size=image_size).save(buf, format="JPEG", quality=92)
    return buf.getvalue(), captions


def default_root(*, seed: int, sizes: tuple[int, int, int], image_size: int) -> Path:
    """`~/.cache/distill/synthetic-<seed>-<hash of sizes, image size and generator version>`."""
    tag = hashlib.sha1(json.dumps([VERSION, *sizes, image_size]).encode()).hexdigest()[:10]
    return Path("~/.cache/distill").expanduser() / f"synthetic-{seed}-{tag}"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `root`, so that concurrent ranks generate only once."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # POSIX only
    except ImportError:  # not on POSIX: generation is deterministic, so races only waste time
        yield
        return
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _example(args: tuple[int, str, int, int]) -> tuple[bytes, list[str]]:
    seed, split, index, image_size = args
    return make_example(seed=seed, split=split, index=index, image_size=image_size)


def _examples(
    *, seed: int, split: str, n: int, image_size: int
) -> Iterator[tuple[bytes, list[str]]]:
    """`make_example` for indices 0..n-1 in order, on every core for large splits."""
    jobs = [(seed, split, index, image_size) for index in range(n)]
    procs = min(os.cpu_count() or 1, 8)
    if n < 500 or procs < 2 or "fork" not in mp.get_all_start_methods():
        yield from map(_example, jobs)
        return
    with mp.get_context("fork").Pool(procs) as pool:  # fork: no re-import of torch per process
        yield from pool.imap(_example, jobs, chunksize=50)


def _karpathy_entry(key: str, image_id: int, split: str, captions: list[str], sentid: int) -> dict:
    sents = [
        {"raw": c, "tokens": words(c), "imgid": image_id, "sentid": sentid + k}
        for k, c in enumerate(captions)
    ]
    return {
        "filename": f"{key}.jpg",
        "filepath": "images",
        "imgid": image_id,
        "split": split,
        "sentences": sents,
        "sentids": [s["sentid"] for s in sents],
    }


def generate(
    root: str | Path,
    *,
    seed: int,
    sizes: tuple[int, int, int],
    image_size: int,
    progress: bool = True,
) -> Path:
    """Write the benchmark under `root` unless `root/_DONE` exists; returns `root`.

    Args:
        root: Output folder.
        seed: Seed of every image and caption.
        sizes: Images in the train, val and test splits.
        image_size: Side of the square images in pixels.
        progress: Show a tqdm progress bar.
    """
    root = Path(root).expanduser()
    with _locked(root):
        if (root / DONE).is_file():
            return root
        (root / "images").mkdir(parents=True, exist_ok=True)
        entries: list[dict] = []
        bar = tqdm(total=sum(sizes), desc=f"synthetic data -> {root}", disable=not progress)
        for split, n in zip(SPLITS, sizes):
            (root / split).mkdir(exist_ok=True)
            examples = _examples(seed=seed, split=split, n=n, image_size=image_size)
            for shard, start in enumerate(range(0, n, SHARD_SIZE)):
                buf = io.BytesIO()
                with wds.TarWriter(buf, encoder=False, mtime=0.0) as tar:
                    for _, (jpg, captions) in zip(
                        range(start, min(n, start + SHARD_SIZE)), examples
                    ):
                        image_id = len(entries)
                        key = f"{image_id:09d}"
                        meta = {
                            "key": key,
                            "caption": captions[0],
                            "captions": captions,
                            "image_id": image_id,
                        }
                        txt, js = captions[0].encode(), json.dumps(meta).encode()
                        tar.write({"__key__": key, "jpg": jpg, "txt": txt, "json": js})
                        (root / "images" / f"{key}.jpg").write_bytes(jpg)
                        entries.append(
                            _karpathy_entry(
                                key, image_id, split, captions, image_id * CAPTIONS_PER_IMAGE
                            )
                        )
                        bar.update()
                write_bytes(root / split / f"{shard:05d}.tar", buf.getvalue())
        bar.close()
        karpathy = {"dataset": "synthetic", "images": entries}
        write_bytes(root / "dataset_synthetic.json", json.dumps(karpathy).encode())
        marker = {"version": VERSION, "seed": seed, "sizes": list(sizes), "image_size": image_size}
        write_bytes(root / DONE, json.dumps(marker).encode())
    return root


def shard_pattern(root: Path, n: int) -> str | None:
    """The brace pattern of a split's shards, or None for an empty split."""
    if n == 0:
        return None
    last = (n - 1) // SHARD_SIZE
    return str(root / f"{{00000..{last:05d}}}.tar") if last else str(root / "00000.tar")


def _register(cls: type) -> type:
    # `python -m distill.data.synthetic` runs this file a second time as __main__: register once.
    return cls if __name__ == "__main__" else DATASETS.register("synthetic")(cls)


@_register
class SyntheticShapes(CaptionDataset):
    """The embedded benchmark of captioned shape scenes, generated on first use.

    Args:
        seed: Seed of every image and caption.
        n_train: Training images (5 captions each).
        n_val: Validation images.
        n_test: Test images.
        image_size: Side of the square images in pixels.
        root: Cache folder; default `~/.cache/distill/synthetic-<seed>-<hash>`.
        format: Read through the "webdataset" shards or the "karpathy" JSON.
    """

    version = VERSION

    def __init__(
        self,
        *,
        seed: int = 0,
        n_train: int = 8000,
        n_val: int = 500,
        n_test: int = 500,
        image_size: int = 64,
        root: str | None = None,
        format: str = "webdataset",
    ) -> None:
        problems = [
            f"data.args.{k}: must be >= 0, got {v}"
            for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))
            if v < 0
        ]
        if image_size < 16:
            problems.append(f"data.args.image_size: must be >= 16, got {image_size}")
        if format not in ("webdataset", "karpathy"):
            problems.append(f"data.args.format: must be 'webdataset' or 'karpathy', got {format!r}")
        if problems:
            raise ConfigError(problems)
        self.seed, self.sizes, self.image_size, self.format = (
            seed,
            (n_train, n_val, n_test),
            image_size,
            format,
        )
        self.root = (
            Path(root).expanduser()
            if root
            else default_root(seed=seed, sizes=self.sizes, image_size=image_size)
        )

    def reader(self) -> CaptionDataset:
        """The reader over the generated files (which must exist)."""
        if self.format == "karpathy":
            return KarpathySplits(
                json_path=str(self.root / "dataset_synthetic.json"), image_root=str(self.root)
            )
        train, val, test = (shard_pattern(self.root / s, n) for s, n in zip(SPLITS, self.sizes))
        return WebDatasetShards(
            urls=train or "",
            val_urls=val,
            test_urls=test,
            num_samples=self.sizes[0] * CAPTIONS_PER_IMAGE,
        )

    def check(self) -> list[str]:
        """Problems of generated files, or a root folder that cannot be created."""
        if (self.root / DONE).is_file():
            wanted = {"version": VERSION, "seed": self.seed, "sizes": list(self.sizes), "image_size": self.image_size}
            try:
                found = json.loads((self.root / DONE).read_text())
            except (OSError, ValueError):
                found = None
            if found != wanted:  # generation skips a finished root: its data is another benchmark
                return [f"data.args.root: {self.root} holds the benchmark generated with {found}, not {wanted}; "
                        "use another root (or delete it to regenerate)"]
            return [f"data.args.root: {line.split(': ', 1)[-1]}" for line in self.reader().check()]
        existing = next(p for p in [self.root, *self.root.parents] if p.exists())
        if not os.access(existing, os.W_OK):
            return [f"data.args.root: cannot create {self.root}: {existing} is not writable"]
        return []

    def prepare(self) -> None:
        generate(self.root, seed=self.seed, sizes=self.sizes, image_size=self.image_size)

    def has_split(self, split: str) -> bool:
        return self.sizes[SPLITS.index(split)] > 0

    def content_signature(self, split: str = "train") -> dict[str, str]:
        """The signature of the generated files the reader reads (its shards, or the JSON and
        the image folder), as `WebDatasetShards` / `KarpathySplits` sign them: size and
        mtime, so a regenerated set (new mtimes) is a new signature even when its bytes
        are the same, and files not generated yet sign as "missing"."""
        return self.reader().content_signature(split)

    def train_size(self, captions_per_image: str) -> int | None:
        return self.sizes[0] * (CAPTIONS_PER_IMAGE if captions_per_image == "all" else 1)

    def shards(self, split: str = "train") -> list[str] | None:
        return self.reader().shards(split)

    def shard_images(self, url: str, skipped: Counter) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        self.prepare()
        return self.reader().shard_images(url, skipped)

    def images(
        self, split: str, *, part: Part, seed: int | None, epoch: int, skipped: Counter
    ) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        self.prepare()
        yield from self.reader().images(split, part=part, seed=seed, epoch=epoch, skipped=skipped)


def main(argv: list[str] | None = None) -> int:
    """`python -m distill.data.synthetic [--write-tokenizer] [--root R --seed S ...]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--write-tokenizer", action="store_true", help=f"rebuild the tokenizer in {TOKENIZER_DIR}"
    )
    parser.add_argument("--generate", action="store_true", help="write the dataset")
    parser.add_argument("--root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=(8000, 500, 500), metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.write_tokenizer:
        print(f"wrote {write_tokenizer()}")
    if args.generate:
        ds = SyntheticShapes(
            seed=args.seed,
            n_train=args.sizes[0],
            n_val=args.sizes[1],
            n_test=args.sizes[2],
            image_size=args.image_size,
            root=args.root,
        )
        ds.prepare()
        print(f"data in {ds.root}")
    if not (args.write_tokenizer or args.generate):
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
