"""`distill search INDEX QUERY`: the top k images of a search index, and a contact sheet."""

from __future__ import annotations

import argparse
import sys

from distill.commands._args import query_arguments
from distill.deploy.search import contact_sheet, format_results, open_search, query, torch_threads
from distill.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("query", help="the text query")
    p.add_argument("-k", type=int, default=10, help="results to show")
    p.add_argument("--sheet", default="search.png", help="contact sheet PNG of the top images ('' for none)")
    query_arguments(p, "the query")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ConfigError(f"-k: must be at least 1, got {args.k}")
    with torch_threads(args.threads):
        index, embedder = open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads)
        if args.model is None:  # the index names the model that answers: say which one runs
            print(f"queries encoded by {index.model} (recorded in the index)", file=sys.stderr)
        query(index, embedder, args.query, args.k)  # warm-up: the first call pays one-time costs
        results = query(index, embedder, args.query, args.k)
    print(format_results(index, results))
    if args.sheet:
        print(f"wrote {contact_sheet(index, results, args.sheet)}")
    return 0
