"""`distill cache CONFIG`: precompute the frozen teachers' outputs over the training data.

`--force` rebuilds the entries even when intact; `--verify` builds nothing and checks the
config's entries (sizes, headers and each array's sha256 against `meta.json`): it prints
one `ok` line per intact entry and exits 2 with one line per damaged file.
"""

from __future__ import annotations

import argparse
import json

from distill.commands._args import config_arguments
from distill.config.schema import Config
from distill.core.check import load_checked
from distill.distributed import is_rank_zero
from distill.errors import ConfigError
from distill.training.cache.build import fill_cache
from distill.training.cache.store import verify_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--device", default="cpu", help="where the teachers run (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default data.eval_batch_size)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="rebuild the entries even if they are intact")
    what.add_argument("--verify", action="store_true",
                      help="build nothing: check every array of the entries against meta.json's sha256")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    config = load_checked(args.config, args.overrides)
    if args.verify:
        return verify(config)
    built = fill_cache(config, device=args.device, batch_size=args.batch_size, force=args.force)
    for name, folder in built.items() if is_rank_zero() else ():
        meta = json.loads((folder / "meta.json").read_text())
        shapes = ", ".join(f"{name}.{o} {s['rows']}x{s['views']}x{s['dim']} ({s['views']} views)" if s.get("views")
                           else f"{name}.{o} {s['rows']}x{s['dim']}" for o, s in meta["outputs"].items())
        layout = f" ({len(meta['shards'])} shards)" if meta.get("layout") == "shards" else ""
        print(f"{name:<12} {shapes} -> {folder}{layout}")
    return 0


def verify(config: Config) -> int:
    """Print `ok` per intact entry; raise the damaged files' lines (the CLI exits 2)."""
    report = verify_cache(config)
    for name, v in report.items():
        if v.folder is not None and not v.problems:
            rate = f", {v.bytes / v.seconds / 1e9:.2f} GB/s" if v.seconds > 0 and v.bytes > 1e8 else ""
            print(f"{name:<12} ok: {v.bytes / 1e6:.3g} MB hashed in {v.seconds:.2f} s{rate} -> {v.folder}")
    problems = [line for v in report.values() for line in v.problems]
    if problems:
        raise ConfigError(problems)
    return 0
