"""`distill serve INDEX`: a local search page over a search index."""

from __future__ import annotations

import argparse

from distill.commands._args import query_arguments
from distill.deploy.search import open_search, torch_threads
from distill.deploy.serve import serve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    query_arguments(p, "queries")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        index, embedder = open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads)
        serve(index, embedder, host=args.host, port=args.port)
    return 0
