"""`distill sweep SWEEP.yaml`: fit and evaluate every variant of an ablation; write the table."""

from __future__ import annotations

import argparse

from distill.training.sweep import run_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML (e.g. experiments/ablations/conaclip_edges.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every variant")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run every variant once per seed (replaces seeds:)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="only these variants, in the file's order (the first is the reference)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    md = run_sweep(args.sweep, args.overrides, seeds=args.seeds, variants=args.variants)
    print(md.read_text().split("\n\n")[1])  # the table
    print(f"wrote {md}, sweep.csv, sweep.json, sweep.png")
    return 0
