"""`distill bench TARGET...`: size, encode latency, memory and search latency vs index size."""

from __future__ import annotations

import argparse

from distill.deploy.bench import format_table, run_bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="TARGET", help="a .ckpt (path.ckpt:model picks a model) or an export folder")
    p.add_argument("--output", default="runs/bench", help="folder for bench.json, bench.md, bench_search.png")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batched latency")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per median")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="index sizes of the search curve")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: cores, at most 4)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    report = run_bench(
        args.targets, args.output, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
        sizes=args.sizes, threads=args.threads,
    )  # fmt: skip
    print(format_table(report))
    print(f"wrote {args.output}/bench.json, bench.md, bench_search.png")
    return 0
