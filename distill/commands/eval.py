"""`distill eval TARGET`: retrieval R@1/5/10 and RSUM of a model of a config or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands._args import target_arguments
from distill.eval.evaluate import evaluate_ranks, save_evaluation
from distill.training.checkpoint import open_target


def add_arguments(p: argparse.ArgumentParser) -> None:
    target_arguments(p)
    p.add_argument("--model", default=None, help="which model of the config to evaluate (default eval.model)")
    p.add_argument("--split", default=None, help="val or test (default eval.split)")
    p.add_argument("--output", default=None,
                   help="folder for eval_<split>.json and the per-query ranks (default: beside a checkpoint)")
    p.set_defaults(fn=run)


def evaluate_target(
    target: str, overrides: list[str] | None = None, *, model: str | None = None, split: str | None = None,
    output: str | None = None,
) -> dict[str, float]:
    """A config (evaluating a model as loaded) or a checkpoint (as trained) on a split; the
    recalls and per-query ranks are written to `output` (default: beside a checkpoint)."""
    trained = open_target(target, overrides, model=model)
    name = model or trained.config.eval.model
    split = split or trained.config.eval.split
    metrics, ranks = evaluate_ranks(trained.graph.models[name], name, trained.config, split)
    folder = output or (str(Path(target).parent) if target.endswith(".ckpt") else None)
    if folder:
        save_evaluation(folder, split, metrics, ranks)
    return metrics


def run(args: argparse.Namespace) -> int:
    metrics = evaluate_target(args.target, args.overrides, model=args.model, split=args.split, output=args.output)
    for key, value in metrics.items():
        print(f"{key:<10} {value:8.2f}")
    return 0
