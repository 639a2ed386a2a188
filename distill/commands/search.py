"""`distill search INDEX QUERY`: the top k images of a search index, and a contact sheet."""

from __future__ import annotations

import argparse
import sys

from distill.commands._args import query_arguments
from distill.deploy.search import contact_sheet, format_results, open_search, query, torch_threads
from distill.errors import ConfigError


def query_parameters(p: argparse.ArgumentParser) -> None:
    """The query parameters of an approximate index (`search` and `serve`)."""
    p.add_argument("--nprobe", type=int, default=None, help="lists an ivf_flat / ivf_pq index scans per query (default: recorded at build)")
    p.add_argument("--ef-search", type=int, default=None, help="candidates an hnsw query keeps (default: recorded at build)")
    p.add_argument("--rerank", type=int, default=None, help="ivf_pq candidates re-scored exactly (default: recorded at build; 0: none)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("query", help="the text query")
    p.add_argument("-k", type=int, default=10, help="results to show")
    p.add_argument("--sheet", default="search.png", help="contact sheet PNG of the top images ('' for none)")
    query_arguments(p, "the query")
    query_parameters(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ConfigError(f"-k: must be at least 1, got {args.k}")
    with torch_threads(args.threads):
        index, embedder = open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads,
                                      nprobe=args.nprobe, ef_search=args.ef_search, rerank=args.rerank)  # fmt: skip
        if args.model is None:  # the index names the model that answers: say which one runs
            print(f"queries encoded by {index.model} (recorded in the index)", file=sys.stderr)
        query(index, embedder, args.query, args.k)  # warm-up: the first call pays one-time costs
        results = query(index, embedder, args.query, args.k)
    print(format_results(index, results))
    if args.sheet:
        print(f"wrote {contact_sheet(index, results, args.sheet)}")
    return 0
