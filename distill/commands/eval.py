"""`distill eval TARGET`: retrieval R@1/5/10 and RSUM of a model of a config or checkpoint, or
(`--task zeroshot --data FOLDER|embedded:<task>`) its zero-shot classification accuracy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from distill.commands._args import target_arguments
from distill.errors import ConfigError
from distill.eval.evaluate import evaluate_ranks, save_evaluation
from distill.eval.zeroshot import (
    EMBEDDED,
    EMBEDDED_TASKS,
    evaluate_zeroshot,
    format_zeroshot,
    open_task,
    save_zeroshot,
)
from distill.training.checkpoint import open_target

TASKS = ("retrieval", "zeroshot")
ZEROSHOT_DATA = f"an image folder (FOLDER/<class>/*.jpg|png) or {', '.join(EMBEDDED + t for t in EMBEDDED_TASKS)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    target_arguments(p)
    p.add_argument("--task", choices=TASKS, default="retrieval",
                   help="retrieval (default): R@K and RSUM on a split; zeroshot: classification of --data")
    p.add_argument("--model", default=None, help="which model of the config to evaluate (default eval.model)")
    p.add_argument("--split", default=None, help="retrieval: val or test (default eval.split)")
    p.add_argument("--data", default=None, help=f"zeroshot: {ZEROSHOT_DATA}")
    p.add_argument("--classnames", default=None,
                   help="zeroshot: class names, one per line in sorted class-folder order, or JSON {folder: name} "
                        "(default: folder names, _ as spaces)")  # fmt: skip
    p.add_argument("--templates", default=None,
                   help="zeroshot: prompt templates, one per line with {c} for the class name (default: built in)")
    p.add_argument("--output", default=None,
                   help="folder for eval_<split>.json and the per-query ranks, or zeroshot_<task>.json "
                        "(default: beside a checkpoint)")  # fmt: skip
    p.set_defaults(fn=run)


def _folder(target: str, output: str | None) -> str | None:
    return output or (str(Path(target).parent) if target.endswith(".ckpt") else None)


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
    folder = _folder(target, output)
    if folder:
        save_evaluation(folder, split, metrics, ranks)
    return metrics


def zeroshot_target(
    target: str, overrides: list[str] | None = None, *, data: str, model: str | None = None,
    classnames: str | None = None, templates: str | None = None, output: str | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of `data` by a model of a config or checkpoint; the result is
    written to `output/zeroshot_<task>.json` (default: beside a checkpoint).

    The task's files are checked before any weights load; an embedded task is then built
    at the benchmark settings of the loaded config.
    """
    task = open_task(data, classnames=classnames, templates=templates)
    trained = open_target(target, overrides, model=model)
    name = model or trained.config.eval.model
    if data.startswith(EMBEDDED):
        task = open_task(data, trained.config.data, classnames=classnames, templates=templates)
    result = evaluate_zeroshot(trained.graph.models[name], name, task, batch_size=trained.config.data.eval_batch_size,
                               num_workers=trained.config.data.num_workers)  # fmt: skip
    folder = _folder(target, output)
    if folder:
        save_zeroshot(folder, result)
    return result


def run(args: argparse.Namespace) -> int:
    zeroshot_only = {"--data": args.data, "--classnames": args.classnames, "--templates": args.templates}
    if args.task == "retrieval":
        given = [flag for flag, value in zeroshot_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: only for --task zeroshot (this is --task retrieval)")
        metrics = evaluate_target(args.target, args.overrides, model=args.model, split=args.split, output=args.output)
        for key, value in metrics.items():
            print(f"{key:<10} {value:8.2f}")
        return 0
    if args.split is not None:
        raise ConfigError("--split: only for --task retrieval (embedded:count reads the test split)")
    if args.data is None:
        raise ConfigError(f"--data: --task zeroshot needs {ZEROSHOT_DATA}")
    result = zeroshot_target(args.target, args.overrides, data=args.data, model=args.model, classnames=args.classnames,
                             templates=args.templates, output=args.output)  # fmt: skip
    print(format_zeroshot(result))
    return 0
