"""`distill cache CONFIG`: precompute the frozen teachers' outputs over the training data."""

from __future__ import annotations

import argparse
import json

from distill.commands._args import config_arguments
from distill.core.check import load_checked
from distill.distributed import is_rank_zero
from distill.training.cache.build import fill_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--device", default="cpu", help="where the teachers run (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default data.eval_batch_size)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    built = fill_cache(load_checked(args.config, args.overrides), device=args.device, batch_size=args.batch_size)
    for name, folder in built.items() if is_rank_zero() else ():
        meta = json.loads((folder / "meta.json").read_text())
        shapes = ", ".join(f"{name}.{o} {s['rows']}x{s['dim']}" for o, s in meta["outputs"].items())
        print(f"{name:<12} {shapes} -> {folder}")
    return 0
