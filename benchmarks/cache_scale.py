"""Teacher cache at scale: lookup cost and memory per rank of both layouts at 10M-100M samples,
the global layout's serial merge, and build throughput vs processes.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/cache_scale.py [--sizes 10000000 100000000] [--dim 64]
        [--batches 200] [--merge-sizes 1000000 10000000] [--procs 1 2] [--parts lookup merge build]

**lookup.** For each N of `--sizes` and each layout, a synthetic entry is written under `--dir`
(default /tmp/cache_scale), read through the production lookup (`cached_node` ->
`CachedNode` / `ShardCachedNode`, batches of `--batch` `SampleKey`s), then deleted before the
next one, so the disk holds one entry at a time: N x (2 D + 11) bytes, 13.9 GB at N = 100M,
D = 64. On disk, per layout:
- global: `text.npy` (N, D) float16 and `text.keys.npy` (N,) S11, sorted: the two files
  `CachedNode` maps;
- shards: N / `--shard-size` folders `shards/<shard_dir(url)>/`, each with its shard's
  `text.npy` and `text.keys.npy`; every shard is written (10K folders at 100M: 41 s here, the
  global layout's two files 50 s). No `done.json` and no `meta.json` on disk: the lookup
  does not read them (`check_entry`, which does, is not what is timed); the `meta.json`
  fields `cached_node` needs are passed in memory.
Keys are img2dataset-like sample keys `f"{i:09d}/0"` (5-digit shard, 4-digit index, caption
0: 11 bytes) of shard URL `/data/train/{i // shard_size:05d}.tar`. Rows are one random fp16
block of `shard_size` rows repeated (row i = block[i % shard_size], checked on each pattern's
first batch): their content does not change the cost. D scales the row reads (B x D x 2
bytes per batch; a row under 4 KB lies in one or two pages) but not the key search, which
touches only the key tables. Key patterns, `--batches` batches each: `uniform` (B keys
uniform over N: no locality, the worst case), `shards8` (`--shards-per-batch` random shards
per batch, B / 8 keys from each, new shards every batch: the shard layout opens 8 shards per
batch, its LRU of OPEN_SHARDS never hits) and `shards8_reused` (the same 8 shards all pass
long: a webdataset loader between shard switches, which come every shard_size x 8 / B = 312
batches). `global+random` is the global layout with its rows' mapping advised MADV_RANDOM (a
row's page fault reads that page, not the 128 KB around it; the key table keeps read-around,
which serves the last ~13 probes of a binary search in one read), uniform keys only: a
what-if, distill does not do it. Each
case: a fresh node, the entry's files dropped from the page cache (`posix_fadvise(DONTNEED)`
per file: needs no root and leaves the rest of the machine's cache alone; the resident
fraction is then checked with `fincore`), one pass over the batches (cold), the same pass
again (warm: what the first pass brought into the page cache).
Memory: the growth of the process's VmRSS, RssAnon (private) and RssFile (mapped cache
pages: shared by the ranks of a node, reclaimable) from before the node opens to after both
passes, and the key-table bytes a rank maps (global: N x 11; shards: at most OPEN_SHARDS
shards' tables).

**merge.** `merge_parts` then `array_record` (the sha256 of what it wrote): the serial rank-0
step of the global build, on `--merge-world` synthetic parts holding n rows in all for each
n of `--merge-sizes` (shards dealt to ranks as `distill cache` deals them): seconds and
peak resident growth (VmHWM after resetting it).

**build.** `python -m torch.distributed.run --standalone --nproc_per_node P -m distill cache
experiments/conaclip.yaml` with the teacher at `--teacher` (the demo's trained towers:
ResNet-18 at 64 px + 4-layer BERT) on `--build-images` images of the embedded data (1000 per
shard, 5 captions each), OMP_NUM_THREADS=1 and no loader workers per process, for each P of
`--procs` and both layouts: the command's wall seconds and the build's own (`meta.json`'s
`seconds`: first barrier to `meta.json`, the global merge included). The global merge is
timed apart on the same rows, dealt into P parts as the ranks wrote them.

Writes benchmarks/results/cache_scale.json; removes everything it wrote under `--dir` unless
`--keep`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, ROOT, median, status_kib, write

from distill.batch import Batch
from distill.data.base import SampleKey
from distill.data.synthetic import SHARD_SIZE, generate
from distill.training.cache.arrays import array_files, array_record
from distill.training.cache.build import merge_parts
from distill.training.cache.shards import OPEN_SHARDS, shard_dir
from distill.training.cache.store import cached_node

DIGITS = 9
KEY_WIDTH = DIGITS + 2  # "/0"
OUTPUT, NODE = "text", "teacher.text"
KEY_CHUNK = 1_000_000


def sample_keys(start: int, stop: int) -> np.ndarray:
    """The sorted S11 keys `f"{i:09d}/0"` of samples start..stop-1, built without Python strings."""
    i = np.arange(start, stop, dtype=np.int64)
    out = np.empty((len(i), KEY_WIDTH), dtype=np.uint8)
    for j in range(DIGITS):
        out[:, DIGITS - 1 - j] = i // 10**j % 10 + ord("0")
    out[:, DIGITS:] = np.frombuffer(b"/0", dtype=np.uint8)
    return out.view(f"S{KEY_WIDTH}").ravel()


def shard_url(s: int) -> str:
    """The (never opened) data shard of shard index `s`."""
    return f"/data/train/{s:05d}.tar"


def write_npy(path: Path, dtype: str | type, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
    """A `.npy` file (header, then the chunks' bytes in order) written without holding the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(chunk.tobytes())


def write_entry(folder: Path, layout: str, n: int, block: np.ndarray) -> list[Path]:
    """Write a synthetic entry of n rows (see the module docstring); returns its files."""
    rows_name, keys_name = array_files(OUTPUT)
    per = len(block)  # = shard size
    if layout == "global":
        write_npy(folder / rows_name, np.float16, (n, block.shape[1]), (block[: n - s] for s in range(0, n, per)))
        write_npy(folder / keys_name, f"S{KEY_WIDTH}", (n,),
                  (sample_keys(s, min(n, s + KEY_CHUNK)) for s in range(0, n, KEY_CHUNK)))
        return [folder / rows_name, folder / keys_name]
    files = []
    for s, start in enumerate(range(0, n, per)):
        where, stop = folder / "shards" / shard_dir(shard_url(s)), min(n, start + per)
        write_npy(where / rows_name, np.float16, (stop - start, block.shape[1]), [block[: stop - start]])
        write_npy(where / keys_name, f"S{KEY_WIDTH}", (stop - start,), [sample_keys(start, stop)])
        files += [where / rows_name, where / keys_name]
    return files


def drop_cache(files: list[Path]) -> None:
    """Evict these files' (clean, unmapped) pages from the page cache, and only theirs."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(files: list[Path]) -> float | None:
    """The fraction of these files' bytes in the page cache (`fincore`), None without fincore."""
    if shutil.which("fincore") is None:
        return None
    res = size = 0
    for start in range(0, len(files), 500):
        done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE",
                               *map(str, files[start : start + 500])], capture_output=True, text=True, check=True)
        for line in done.stdout.split("\n"):
            if line.strip():
                r, s = line.split()
                res, size = res + int(r), size + int(s)
    return res / size if size else 0.0


def key_batches(pattern: str, n: int, per_shard: int, batch: int, count: int, shards_per_batch: int,
                rng: np.random.Generator) -> list[tuple[np.ndarray, Batch]]:
    """(sample indices, Batch of their `SampleKey`s) for `count` batches of one pattern: `uniform`,
    `shards<k>` (k new random shards per batch) or `shards<k>_reused` (the same k shards all along)."""
    shards, out = math.ceil(n / per_shard), []
    fixed = rng.choice(shards, min(shards_per_batch, shards), replace=False)
    for _ in range(count):
        if pattern == "uniform":
            idx = rng.integers(0, n, batch)
        else:
            picked = fixed if pattern.endswith("_reused") else rng.choice(shards, len(fixed), replace=False)
            sizes = [len(a) for a in np.array_split(np.arange(batch), len(picked))]
            idx = np.concatenate([rng.integers(s * per_shard, min(n, (s + 1) * per_shard), k)
                                  for s, k in zip(picked, sizes)])
            rng.shuffle(idx)  # a loader's batch mixes the samples of its shards
        keys: list[str] = [SampleKey(f"{i:0{DIGITS}d}/0", shard_url(i // per_shard)) for i in idx]
        out.append((idx, Batch(keys=keys, image_ids=torch.arange(len(keys)))))
    return out


def timed_pass(node: Any, batches: list[tuple[np.ndarray, Batch]], block: np.ndarray) -> list[float]:
    """Seconds of each lookup; the first batch's rows are checked against what was written."""
    times = []
    for j, (idx, b) in enumerate(batches):
        start = time.perf_counter()
        rows = node(b)
        times.append(time.perf_counter() - start)
        if j == 0:
            np.testing.assert_array_equal(rows.numpy(), block[idx % len(block)].astype(np.float32))
    return times


def ms(times: list[float]) -> dict[str, float]:
    """Median, 90th percentile and mean, in ms."""
    return {"median": round(1e3 * median(times), 3), "p90": round(1e3 * float(np.percentile(times, 90)), 3),
            "mean": round(1e3 * float(np.mean(times)), 3)}


def memory() -> dict[str, int]:
    return {k: status_kib(k) for k in ("VmRSS", "RssAnon", "RssFile")}


def open_node(folder: Path, layout: str, meta: dict[str, Any]) -> Any:
    """The production lookup of the entry; `global+random` is `CachedNode` with its rows' mapping
    advised MADV_RANDOM (no read-around on a row's page fault): a what-if, distill does not do it."""
    node = cached_node(folder, OUTPUT, NODE, meta)
    if layout == "global+random":
        _, rows = node._open()
        rows._mmap.madvise(mmap.MADV_RANDOM)
    return node


def lookup_part(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Every (N, layout, pattern) case of the lookup benchmark."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((args.shard_size, args.dim)).astype(np.float16)
    k = args.shards_per_batch
    cases = []
    for n in args.sizes:
        shards = math.ceil(n / args.shard_size)
        patterns = {p: key_batches(p, n, args.shard_size, args.batch, args.batches, k, rng)
                    for p in ("uniform", f"shards{k}", f"shards{k}_reused")}
        for layout in ("global", "shards"):
            folder = root / f"lookup-{n}-{layout}"
            start = time.perf_counter()
            files = write_entry(folder, layout, n, block)
            written_s = time.perf_counter() - start
            meta = {"outputs": {OUTPUT: {"rows": n, "dim": args.dim}}, **({"layout": "shards"} if layout == "shards" else {})}
            open_tables = n if layout == "global" else min(OPEN_SHARDS, shards) * args.shard_size
            variants = [(layout, p) for p in patterns] + ([("global+random", "uniform")] if layout == "global" else [])
            for variant, pattern in variants:
                batches = patterns[pattern]
                gc.collect()
                drop_cache(files)
                cold_resident = resident(files)
                before = memory()
                node = open_node(folder, variant, meta)
                cold = timed_pass(node, batches, block)
                warm = timed_pass(node, batches, block)
                grown = {k: round((v - before[k]) / 1024, 1) for k, v in memory().items()}
                del node
                cases.append({"n": n, "layout": variant, "pattern": pattern, "cold_ms": ms(cold), "warm_ms": ms(warm),
                              "resident_before_cold": cold_resident, "rss_growth_mib": grown,
                              "key_table_bytes_mapped": open_tables * KEY_WIDTH, "files": len(files),
                              "bytes_on_disk": sum(f.stat().st_size for f in files), "write_s": round(written_s, 1),
                              "loadavg_1min": os.getloadavg()[0]})
                c = cases[-1]
                print(f"  N={n:>11,} {variant:<13} {pattern:<15} cold {c['cold_ms']['median']:8.2f} / "
                      f"{c['cold_ms']['p90']:8.2f} (mean {c['cold_ms']['mean']:7.2f}) ms  warm "
                      f"{c['warm_ms']['median']:7.2f} / {c['warm_ms']['p90']:7.2f} ms  RSS +{grown['VmRSS']:.0f} MiB"
                      f"  (written in {written_s:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    return cases


def write_parts(parts: Path, output: str, keys: np.ndarray, ids: np.ndarray, rows_of: Any, world: int,
                per_shard: int) -> None:
    """Rank r's part as `distill cache` writes it: the rows of shards r, r + W, ... (`ids` // `per_shard`
    is a row's shard), in stored order."""
    parts.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        mine = np.flatnonzero(ids // per_shard % world == r)
        with open(parts / f"{output}.rank{r}.f16", "wb") as f:
            for start in range(0, len(mine), KEY_CHUNK):
                f.write(np.ascontiguousarray(rows_of(mine[start : start + KEY_CHUNK]), dtype=np.float16).tobytes())
        np.save(parts / f"{output}.rank{r}.keys.npy", keys[mine])


def timed_merge(parts: Path, outputs: list[str], world: int, folder: Path) -> dict[str, float]:
    """Seconds of `merge_parts` and of `array_record`, and the peak resident growth (MiB)."""
    gc.collect()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = status_kib("VmRSS")
    except OSError:
        base = None
    start = time.perf_counter()
    merge_parts(parts, outputs, world, folder)
    merged = time.perf_counter()
    array_record(folder, outputs)
    hashed = time.perf_counter()
    peak = None if base is None else round((status_kib("VmHWM") - base) / 1024, 1)
    return {"merge_s": round(merged - start, 3), "sha256_s": round(hashed - merged, 3), "peak_rss_growth_mib": peak}


def merge_part(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """`merge_parts` + `array_record` on synthetic parts of each size of `--merge-sizes`."""
    block = np.random.default_rng(1).standard_normal((args.shard_size, args.dim)).astype(np.float16)
    out = []
    for n in args.merge_sizes:
        folder = root / f"merge-{n}"
        keys = sample_keys(0, n)
        write_parts(folder / "parts", OUTPUT, keys, np.arange(n), lambda i: block[i % len(block)], args.merge_world,
                    args.shard_size)
        del keys
        drop_cache(list((folder / "parts").iterdir()))  # rank 0 reads the other ranks' parts from disk
        row = {"n": n, "world": args.merge_world, "dim": args.dim,
               **timed_merge(folder / "parts", [OUTPUT], args.merge_world, folder / "entry")}
        merged = np.load(folder / "entry" / f"{OUTPUT}.npy", mmap_mode="r")
        probe = np.random.default_rng(2).integers(0, n, 64)
        np.testing.assert_array_equal(merged[probe], block[probe % len(block)])  # sorted keys = sample order
        del merged
        row["us_per_row"] = round(1e6 * (row["merge_s"] + row["sha256_s"]) / n, 3)
        out.append(row)
        print(f"  merge n={n:>11,} world {args.merge_world}: {row['merge_s']:.1f} s + sha256 {row['sha256_s']:.1f} s, "
              f"peak RSS +{row['peak_rss_growth_mib']} MiB", flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    return out


def build_part(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """`distill cache` under torchrun for each process count and layout (see the docstring)."""
    teacher = Path(args.teacher).resolve()
    if not (teacher / "towers.json").is_file():
        raise SystemExit(f"cache_scale: --teacher {args.teacher} is not a towers folder (run `distill demo` first)")
    data = root / "build" / "data"
    start = time.perf_counter()
    generate(data, seed=0, sizes=(args.build_images, 0, 0), image_size=64, progress=False)  # SyntheticShapes' defaults
    data_s = time.perf_counter() - start
    runs: list[dict[str, Any]] = []
    for layout in ("global", "shards"):
        for procs in args.procs:
            cache_dir = root / "build" / f"cache-{layout}-{procs}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "distill", "cache", str(ROOT / "experiments" / "conaclip.yaml"),
                   f"models.teacher.args.path={teacher}",
                   f"data.args={{n_train: {args.build_images}, n_val: 0, n_test: 0, root: '{data}'}}",
                   "data.num_workers=0", f"cache.dir={cache_dir}", f"cache.layout={layout}",
                   f"output_dir={root / 'build' / 'run'}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            load = os.getloadavg()[0]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"cache_scale: {' '.join(cmd[:8])} ... failed:\n{(done.stdout + done.stderr)[-3000:]}")
            folder = next(cache_dir.glob("*/meta.json")).parent
            meta = json.loads((folder / "meta.json").read_text())
            run = {"layout": layout, "procs": procs, "wall_s": round(wall, 1), "build_s": meta["seconds"],
                   "images_per_s": round(args.build_images / meta["seconds"], 1),
                   "rows": {o: s["rows"] for o, s in meta["outputs"].items()}, "dim": meta["outputs"]["text"]["dim"],
                   "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0]}
            if layout == "shards":
                run["shards"] = len(meta["shards"])
            else:  # the serial merge, timed apart on the same rows dealt into `procs` parts
                for o in meta["outputs"]:
                    keys = np.load(folder / array_files(o)[1])
                    rows = np.load(folder / array_files(o)[0])
                    ids = np.array([int(k[:DIGITS]) for k in keys])  # image id = <image key>, 1000 per shard
                    write_parts(root / "build" / "parts", o, keys, ids, rows.__getitem__, procs, SHARD_SIZE)
                run.update(timed_merge(root / "build" / "parts", list(meta["outputs"]), procs, root / "build" / "merged"))
                shutil.rmtree(root / "build" / "parts")
                shutil.rmtree(root / "build" / "merged")
            runs.append(run)
            print(f"  build {layout:<7} {procs} proc: {run['build_s']:.1f} s ({run['images_per_s']:.0f} images/s, "
                  f"wall {wall:.1f} s, load {load:.1f})", flush=True)
    return {"images": args.build_images, "captions": 5 * args.build_images, "shard_size": SHARD_SIZE,
            "teacher": str(teacher.relative_to(ROOT) if teacher.is_relative_to(ROOT) else teacher),
            "data_generation_s": round(data_s, 1), "runs": runs, "formula": formula(runs, args)}


def formula(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The constants of T_global = E / (N G) + M(n) and T_shards = ceil(S / (N G)) x t_shard."""
    one = {r["layout"]: r for r in runs if r["procs"] == 1}
    if "global" not in one or "shards" not in one:
        return {}
    merge = one["global"]["merge_s"] + one["global"]["sha256_s"]
    return {"global": "T = E / (N G) + M(n): encode split over N nodes x G processes, then rank 0's serial merge",
            "shards": "T = ceil(S / (N G)) x t_shard: no merge (rank 0 only reads S done.json)",
            "encode_s_per_image_1proc": round((one["global"]["build_s"] - merge) / args.build_images, 5),
            "merge_s_per_image_1proc": round(merge / args.build_images, 6),
            "t_shard_s": round(one["shards"]["build_s"] / one["shards"]["shards"], 2)}


def needed_bytes(args: argparse.Namespace) -> int:
    """Disk the run needs at its peak (one lookup entry at a time unless --keep, merge parts + entry)."""
    entries = [n * (2 * args.dim + KEY_WIDTH) for n in args.sizes if "lookup" in args.parts] or [0]
    merges = [n * (4 * args.dim + 3 * KEY_WIDTH) for n in args.merge_sizes if "merge" in args.parts] or [0]
    lookup = 2 * sum(entries) if args.keep else max(entries)
    return max(lookup, max(merges)) + (400 << 20 if "build" in args.parts else 0) + (1 << 30)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000_000, 100_000_000], help="lookup: samples N")
    parser.add_argument("--dim", type=int, default=64, help="fp16 values per row")
    parser.add_argument("--batch", type=int, default=256, help="keys per lookup")
    parser.add_argument("--batches", type=int, default=200, help="lookups per pass (cold, then warm)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per data shard")
    parser.add_argument("--shards-per-batch", type=int, default=8)
    parser.add_argument("--merge-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--merge-world", type=int, default=2, help="ranks whose parts the merge reads")
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2], help="build: processes")
    parser.add_argument("--build-images", type=int, default=4000)
    parser.add_argument("--teacher", default=str(ROOT / "runs" / "demo" / "teacher" / "towers"))
    parser.add_argument("--parts", nargs="+", choices=["lookup", "merge", "build"], default=["lookup", "merge", "build"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cache_scale"), help="where the synthetic files go")
    parser.add_argument("--keep", action="store_true", help="keep the files written under --dir")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_scale.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    existing = next(p for p in [args.dir, *args.dir.parents] if p.exists())
    need, free = needed_bytes(args), shutil.disk_usage(existing).free
    if free < need:
        raise SystemExit(f"cache_scale: needs {need / 1e9:.1f} GB free under {args.dir}, {existing} has "
                         f"{free / 1e9:.1f} GB: pass smaller --sizes / --merge-sizes or another --dir")
    created = not args.dir.exists()
    root = args.dir / f"run-{os.getpid()}"
    root.mkdir(parents=True)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    result: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "key_width": KEY_WIDTH, "open_shards": OPEN_SHARDS}
    try:
        if "lookup" in args.parts:
            print(f"lookup: B={args.batch}, D={args.dim} fp16, {args.batches} batches per pass; ms per lookup: "
                  "median / p90", flush=True)
            result["lookup"] = lookup_part(args, root)
        if "merge" in args.parts:
            print("merge (the global build's serial step):", flush=True)
            result["merge"] = merge_part(args, root)
        if "build" in args.parts:
            print("build (distill cache under torchrun):", flush=True)
            result["build"] = build_part(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir if created else root, ignore_errors=True)
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    result["uptime"] = uptime
    report(result)
    write(result, args.out)
    return result


def report(result: dict[str, Any]) -> None:
    """The summary table."""
    if result.get("lookup"):
        print(f"\n{'N':>12} {'layout':<13} {'pattern':<15} {'cold ms med/p90/mean':>24} {'warm ms med/p90':>17} "
              f"{'RSS+ MiB anon/file':>19} {'keys mapped MiB':>16}")
        for c in result["lookup"]:
            cold, warm, g = c["cold_ms"], c["warm_ms"], c["rss_growth_mib"]
            print(f"{c['n']:>12,} {c['layout']:<13} {c['pattern']:<15} {cold['median']:>8.2f}/{cold['p90']:.2f}/"
                  f"{cold['mean']:<8.2f} "
                  f"{warm['median']:>8.2f}/{warm['p90']:<8.2f} {g['RssAnon']:>9.0f}/{g['RssFile']:<9.0f} "
                  f"{c['key_table_bytes_mapped'] / 2**20:>16.1f}")
    for m in result.get("merge", []):
        print(f"merge n={m['n']:,}: {m['merge_s']} s + sha256 {m['sha256_s']} s ({m['us_per_row']} us/row), "
              f"peak RSS +{m['peak_rss_growth_mib']} MiB")
    build = result.get("build")
    if build:
        one = {r["layout"]: r["build_s"] for r in build["runs"] if r["procs"] == 1}
        for r in build["runs"]:
            merge = f", merge {r['merge_s'] + r['sha256_s']:.2f} s" if "merge_s" in r else ""
            print(f"build {r['layout']:<7} {r['procs']} proc: {r['build_s']:6.1f} s, {r['images_per_s']:6.1f} images/s, "
                  f"x{one.get(r['layout'], r['build_s']) / r['build_s']:.2f} vs 1 proc{merge}")
        print(f"formula: {build['formula']}")
    print("uptime: " + " -> ".join(result["uptime"]))


if __name__ == "__main__":
    main()
