"""`distill sweep SWEEP.yaml`: fit and evaluate every variant of an ablation; write the table."""

from __future__ import annotations

import argparse

from distill.training.sweep import run_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML (e.g. experiments/ablations/conaclip_edges.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every variant")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    print(f"wrote {run_sweep(args.sweep, args.overrides)}")
    return 0
