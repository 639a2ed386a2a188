"""`distill serve INDEX`: a local search page over a search index."""

from __future__ import annotations

import argparse
import sys

from distill.commands._args import query_arguments
from distill.commands.search import query_parameters
from distill.deploy.search import open_search, torch_threads
from distill.deploy.serve import MAX_QUERY, TIMEOUT, WORKERS, check_options, serve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (f"{(p.description or 'a local search page').rstrip('.')}. The page has no authentication: it listens on loopback by default, "
                     f"answers only requests whose Host header is a loopback name, the bound address or an "
                     f"--allowed-host, and limits queries to {MAX_QUERY} characters.")  # fmt: skip
    p.add_argument("index", help="index file written by `distill index build`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other, e.g. 0.0.0.0, warns: no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME", dest="allowed_hosts",
                   help="also accept requests whose Host header names NAME (repeatable); "
                        "127.0.0.1, localhost, ::1 and a specific --host always are")
    p.add_argument("--workers", type=int, default=WORKERS,
                   help=f"connections handled at once (default {WORKERS}); more wait in the listen backlog")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help=f"seconds a client has to send its request, and may stay silent (default {TIMEOUT:g})")
    query_arguments(p, "queries")
    query_parameters(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    check_options(args.workers, args.timeout, args.allowed_hosts)  # before the slow part: loading the model
    with torch_threads(args.threads):
        index, embedder = open_search(args.index, model=args.model, faiss=args.faiss, device=args.device, threads=args.threads,
                                      nprobe=args.nprobe, ef_search=args.ef_search, rerank=args.rerank)  # fmt: skip
        if args.model is None:  # the index names the model that answers: say which one runs
            print(f"queries encoded by {index.model} (recorded in the index)", file=sys.stderr)
        serve(index, embedder, host=args.host, port=args.port, allowed_hosts=args.allowed_hosts,
              workers=args.workers, timeout=args.timeout)  # fmt: skip
    return 0
