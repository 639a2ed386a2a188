"""`distill` command line: fit, validate, graph, eval, demo, cache, index, sweep.

Config problems print one line each on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from distill.errors import ConfigError


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns Config
    from distill.config import load_config

    return load_config(args.config, args.overrides)


def cmd_fit(args: argparse.Namespace) -> int:
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from distill.train import fit

    metrics, _ = fit(_load(args))
    for key, value in sorted(metrics.items()) if rank_zero_only.rank == 0 else ():  # once under DDP
        print(f"{key:<16} {value:8.2f}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    import json
    import os

    from distill.cache_build import build_cache

    built = build_cache(_load(args), device=args.device, batch_size=args.batch_size)
    for name, folder in built.items() if os.environ.get("RANK", "0") == "0" else ():
        meta = json.loads((folder / "meta.json").read_text())
        shapes = ", ".join(f"{name}.{o} {s['rows']}x{s['dim']}" for o, s in meta["outputs"].items())
        print(f"{name:<12} {shapes} -> {folder}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from distill.describe import describe

    print(describe(_load(args)))
    print("config OK")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from distill.describe import draw

    print(f"wrote {draw(_load(args), args.output)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate_target

    metrics = evaluate_target(args.target, args.overrides, model=args.model, split=args.split)
    for key, value in metrics.items():
        print(f"{key:<10} {value:8.2f}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from distill.index import index_target

    index = index_target(args.target, args.overrides, model=args.model, output=args.output, k=args.k, device=args.device)
    print(f"wrote {args.output}: {len(index['keys'])} samples, {index['k']} negatives per sample and direction")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from distill.sweep import run_sweep

    print(f"wrote {run_sweep(args.sweep, args.overrides)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.demo import run_demo

    run_demo(args.output, quick=args.quick)
    return 0


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. edges.si_tt.enabled=false")


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `distill` command."""
    ap = argparse.ArgumentParser(prog="distill", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "fit": (cmd_fit, "train the students of a graph config"),
        "validate": (cmd_validate, "check a config and print the resolved graph"),
        "graph": (cmd_graph, "draw the graph of a config"),
        "cache": (cmd_cache, "precompute the frozen teachers' outputs over the training data"),
    }
    for name, (fn, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        _with_config(p)
        p.set_defaults(fn=fn)
        if name == "graph":
            p.add_argument("-o", "--output", default="graph.png", help="output image (png, svg, pdf)")
        if name == "cache":
            p.add_argument("--device", default="cpu", help="where the teachers run (cpu, cuda, cuda:1)")
            p.add_argument("--batch-size", type=int, default=None, help="images per batch (default data.eval_batch_size)")
    p = sub.add_parser("eval", help="retrieval R@1/5/10 and RSUM of a model (config or checkpoint)")
    p.add_argument("target", help="experiment YAML or a .ckpt written by `distill fit`")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--model", default=None, help="which model of the config to evaluate (default eval.model)")
    p.add_argument("--split", default=None, help="val or test (default eval.split)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("index", help="embed the training corpus with a model and mine hard negatives")
    p.add_argument("target", help="experiment YAML (model as built) or a .ckpt written by `distill fit`")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--model", required=True, help="which model of the config embeds the corpus")
    p.add_argument("--output", required=True, help="index file to write (torch.save)")
    p.add_argument("--k", type=int, default=32, help="negatives mined per sample and direction")
    p.add_argument("--device", default="cpu", help="where to run the model")
    p.set_defaults(fn=cmd_index)
    p = sub.add_parser("sweep", help="fit and evaluate every variant of a sweep YAML; write the table")
    p.add_argument("sweep", help="sweep YAML (e.g. experiments/ablations/conaclip_edges.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every variant")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("demo", help="the main job: teacher, student alone, distilled student, report")
    p.add_argument("-o", "--output", default="runs/demo", help="run folder")
    p.add_argument("--quick", action="store_true", help="tiny data and few steps (smoke test)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
