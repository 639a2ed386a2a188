"""`distill` command line: fit, validate, graph, eval, demo, cache, index (mine, build), search, serve, sweep,
export, bench.

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


def cmd_index_mine(args: argparse.Namespace) -> int:
    from distill.index import index_target

    index = index_target(args.target, args.overrides, model=args.model, output=args.output, k=args.k, device=args.device)
    print(f"wrote {args.output}: {len(index['keys'])} samples, {index['k']} negatives per sample and direction")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from distill.deploy.search import build_command, torch_threads

    with torch_threads(args.threads):
        index, skipped = build_command(
            args.sources, model=args.model, output=args.output, batch_size=args.batch_size, dtype=args.dtype,
            thumb_size=args.thumb_size, faiss=args.faiss, device=args.device, data_args=args.data_arg,
            threads=args.threads or None,
        )  # fmt: skip
    n, d = index["embeddings"].shape
    print(f"wrote {args.output}: {n} images x {d} ({args.dtype}), {index['embedder']}")
    if skipped.counts:
        print(f"skipped {skipped.summary()}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from distill.deploy import search

    if args.k < 1:
        raise ConfigError(f"-k: must be at least 1, got {args.k}")
    with search.torch_threads(args.threads):
        index, embedder = search.open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads)
        search.query(index, embedder, args.query, args.k)  # warm-up: the first call pays one-time costs
        results = search.query(index, embedder, args.query, args.k)
    print(search.format_results(index, results))
    if args.sheet:
        print(f"wrote {search.contact_sheet(index, results, args.sheet)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from distill.deploy.search import open_search, torch_threads
    from distill.deploy.serve import serve

    with torch_threads(args.threads):
        index, embedder = open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads)
        serve(index, embedder, host=args.host, port=args.port)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from distill.sweep import run_sweep

    print(f"wrote {run_sweep(args.sweep, args.overrides)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.demo import run_demo

    run_demo(args.output, quick=args.quick)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distill.deploy.export import export_checkpoint, summary
    from distill.deploy.parity import ParityError

    try:
        folder = export_checkpoint(
            args.checkpoint, format=args.format, model=args.model, output=args.output,
            quantize_text=args.quantize_text, images=args.images, captions=args.captions, weights=args.weights,
        )  # fmt: skip
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(folder))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distill.deploy.bench import format_table, run_bench

    report = run_bench(
        args.targets, args.output, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
        sizes=args.sizes, threads=args.threads,
    )  # fmt: skip
    print(format_table(report))
    print(f"wrote {args.output}/bench.json, bench.md, bench_search.png")
    return 0


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. edges.si_tt.enabled=false")


EMBEDDER = "an export folder (manifest.json) or a .ckpt written by `distill fit` (path.ckpt:model picks a model)"


def _index_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("index", help="hard-negative mining (mine) or a search index of images (build)")
    isub = group.add_subparsers(dest="index_command", required=True)
    p = isub.add_parser("mine", help="embed the training corpus with a model and mine hard negatives")
    p.add_argument("target", help="experiment YAML (model as built) or a .ckpt written by `distill fit`")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--model", required=True, help="which model of the config embeds the corpus")
    p.add_argument("--output", required=True, help="index file to write (torch.save)")
    p.add_argument("--k", type=int, default=32, help="negatives mined per sample and direction")
    p.add_argument("--device", default="cpu", help="where to run the model")
    p.set_defaults(fn=cmd_index_mine)
    p = isub.add_parser("build", help="embed an image folder, shards or a dataset split into a search index")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image folder (recursive), .tar shards (brace pattern, `::` joins) or DATASET:SPLIT (synthetic:test)")
    p.add_argument("--model", required=True, help=f"the embedder: {EMBEDDER}")
    p.add_argument("--output", required=True, help="index file to write")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage of the embeddings")
    p.add_argument("--thumb-size", type=int, default=128, help="side of the JPEG thumbnails stored for display; 0: none")
    p.add_argument("--faiss", action="store_true", help="search this index with FAISS (IndexFlatIP) by default")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE", help="argument of a DATASET:SPLIT source (repeat)")
    p.add_argument("--device", default="cpu", help="where to run a checkpoint's model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the image encoder (0: library defaults)")
    p.set_defaults(fn=cmd_index_build)


def _query_options(p: argparse.ArgumentParser, what: str) -> None:
    """The options `search` and `serve` share: which embedder answers, where, and how."""
    p.add_argument("--model", default=None, help=f"encode {what} with another embedder of the same dimension: {EMBEDDER}")
    p.add_argument("--faiss", action="store_true", help="search with FAISS (IndexFlatIP) instead of torch")
    p.add_argument("--device", default="cpu", help="where to run a checkpoint's model")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the query encoder and search (0: library defaults)")


def _search_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="text-to-image search in an index; prints the top k, writes a contact sheet")
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("query", help="the text query")
    p.add_argument("-k", type=int, default=10, help="results to show")
    p.add_argument("--sheet", default="search.png", help="contact sheet PNG of the top images ('' for none)")
    _query_options(p, "the query")
    p.set_defaults(fn=cmd_search)
    p = sub.add_parser("serve", help="a local search page over an index")
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    _query_options(p, "queries")
    p.set_defaults(fn=cmd_serve)


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint's model to ONNX or TorchScript, checked for parity")
    p.add_argument("checkpoint", help="a .ckpt written by `distill fit`")
    p.add_argument("--format", default="onnx", help="onnx or torchscript")
    p.add_argument("--model", default=None, help="which model of the checkpoint (default eval.model)")
    p.add_argument("--output", default=None, help="export folder (default <checkpoint folder>/export-<model>-<format>)")
    p.add_argument("--quantize-text", default=None, help="int8: dynamic int8 text encoder (onnx); prints its recall cost")
    p.add_argument("--images", default=None, help="folder of parity images (default: the dataset's test split)")
    p.add_argument("--captions", default=None, help="file of parity captions, one a line (default: the test split's)")
    p.add_argument("--weights", action="store_true", help="also write the PyTorch weights as weights.safetensors")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("bench", help="efficiency report: size, encode latency, memory, search latency vs index size")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="a .ckpt (path.ckpt:model picks a model) or an export folder")
    p.add_argument("--output", default="runs/bench", help="folder for bench.json, bench.md, bench_search.png")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batched latency")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per median")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="index sizes of the search curve")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: cores, at most 4)")
    p.set_defaults(fn=cmd_bench)


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
    _index_parsers(sub)
    _search_parsers(sub)
    _deploy_parsers(sub)
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
