"""`distill fit CONFIG [overrides]`: train (every stage of a staged config), print the metrics."""

from __future__ import annotations

import argparse

from distill.commands._args import config_arguments
from distill.core.check import load_checked
from distill.distributed import is_rank_zero
from distill.training.stages import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    metrics, _ = train(load_checked(args.config, args.overrides))
    for key, value in sorted(metrics.items()) if is_rank_zero() else ():  # once under DDP
        print(f"{key:<16} {value:8.2f}")
    return 0
