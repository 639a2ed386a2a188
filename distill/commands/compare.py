"""`distill compare A B`: is A better than B? Per-metric difference, a paired bootstrap
interval over the test queries and a sign-test p-value (`distill.eval.stats`).

A and B are each a `.ckpt` (evaluated on `--split` now; its ranks are saved beside it), a run
folder holding `eval_<split>.ranks.npz` (what `distill sweep` and `distill eval` write), or
a sweep variant's folder with one `seed<s>/` run per seed (paired with B's by seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import ConfigError
from distill.eval.ablation import difference_line
from distill.eval.evaluate import evaluate_ranks, load_ranks, save_evaluation
from distill.eval.stats import compare_runs
from distill.io import write_json
from distill.training.checkpoint import load_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="a .ckpt, a run folder with eval_<split>.ranks.npz, or a folder of seed<s>/ runs")
    p.add_argument("b", metavar="B", help="the same for the model A is compared with")
    p.add_argument("--split", default="test", help="the split both were evaluated on (default test)")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--output", default=None, help="also write the comparison as JSON here")
    p.set_defaults(fn=run)


def runs_of(target: str, split: str) -> dict[str, dict[str, Any]]:
    """Seed label -> per-query ranks of a target (one entry unless it is a folder of seeds)."""
    path = Path(target)
    if path.suffix == ".ckpt":
        trained = load_checkpoint(path)
        name = trained.config.eval.model
        metrics, ranks = evaluate_ranks(trained.graph.models[name], name, trained.config, split)
        save_evaluation(path.parent, split, metrics, ranks)
        return {"": ranks}
    if not path.is_dir():
        raise ConfigError(f"{target}: neither a .ckpt nor a run folder")
    seeds = sorted(p for p in path.glob("seed*") if (p / f"eval_{split}.ranks.npz").is_file())
    if seeds and not (path / f"eval_{split}.ranks.npz").is_file():
        return {p.name: load_ranks(p, split) for p in seeds}
    return {"": load_ranks(path, split)}


def run(args: argparse.Namespace) -> int:
    if args.draws < 100:
        raise ConfigError(f"--draws: at least 100 resamples are needed for a 95% interval, got {args.draws}")
    a, b = runs_of(args.a, args.split), runs_of(args.b, args.split)
    common = [s for s in a if s in b] if set(a) != {""} or set(b) != {""} else [""]
    if not common:
        raise ConfigError(f"{args.b}: no seed in common with {args.a} ({', '.join(a)} vs {', '.join(b)})")
    for label in common:
        if not np.array_equal(a[label].get("text_image_ids", ()), b[label].get("text_image_ids", ())):
            raise ConfigError(f"{args.b}: evaluated on other queries than {args.a}; use the same --split and data")
    try:
        diffs = compare_runs([a[s] for s in common], [b[s] for s in common], draws=args.draws, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"compare: {e}") from e
    runs = f"{len(common)} paired run(s)" + (f" ({', '.join(common)})" if common != [""] else "")
    print(f"A = {args.a}\nB = {args.b}\n{args.split} split, {runs}, {args.draws} bootstrap draws; 95% intervals of A - B")
    print(f"{'metric':<8} {'A':>8} {'B':>8} {'A - B':>8}  interval")
    for d in diffs:
        print(difference_line(d))
    if args.output:
        write_json(args.output, {"a": args.a, "b": args.b, "split": args.split, "runs": common,
                                 "draws": args.draws, "metrics": [d.as_dict() for d in diffs]})  # fmt: skip
        print(f"wrote {args.output}")
    return 0
