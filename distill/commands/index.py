"""`distill index mine` (hard negatives of the training corpus, for `hard_negative` edges)
and `distill index build` (a search index of images, for `search` and `serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from distill.commands._args import EMBEDDER, target_arguments
from distill.deploy.index_kinds import AUTO_ANN, AUTO_EXACT_MAX, KINDS
from distill.deploy.search import build_search_index, torch_threads
from distill.negatives.mine import mine_negatives
from distill.negatives.store import save_negatives
from distill.training.checkpoint import open_target


def add_arguments(group: argparse.ArgumentParser) -> None:
    sub = group.add_subparsers(dest="index_command", required=True, metavar="{mine,build}")
    p = sub.add_parser("mine", help="embed the training corpus with a model and mine hard negatives")
    target_arguments(p)
    p.add_argument("--model", required=True, help="which model of the config embeds the corpus")
    p.add_argument("--output", required=True, help="negatives file to write (torch.save)")
    p.add_argument("--k", type=int, default=32, help="negatives mined per sample and direction")
    p.add_argument("--device", default="cpu", help="where to run the model")
    p.set_defaults(fn=run_mine)
    p = sub.add_parser("build", help="embed an image folder, shards or a dataset split into a search index")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image folder (recursive), .tar shards (brace pattern, `::` joins) or DATASET:SPLIT (synthetic:test)")
    p.add_argument("--model", required=True, help=f"the embedder: {EMBEDDER}")
    p.add_argument("--output", required=True, help="index file to write")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                   help=f"how queries search: exact (every row) or approximate through FAISS (ivf_flat, ivf_pq, hnsw); "
                        f"auto: exact up to {AUTO_EXACT_MAX:,} images (of 128 dimensions), {AUTO_ANN} above")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a parameter of an approximate kind (repeat): ivf_flat nlist, train_size, nprobe; ivf_pq also m, "
                        "nbits, rerank; hnsw M, ef_construction, ef_search. The others are chosen from the index size")
    p.add_argument("--dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="storage of the embeddings: float32, float16 or int8 (a scale and offset per dimension); an "
                        "exact index searches them as stored")
    p.add_argument("--thumb-size", type=int, default=128, help="side of the JPEG thumbnails stored for display; 0: none")
    p.add_argument("--faiss", action="store_true", help="search this exact index with FAISS by default (IndexFlatIP; for float16 and int8 its one-pass "
                        "scalar-quantizer scans, faster on a busy machine)")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE", help="argument of a DATASET:SPLIT source (repeat)")
    p.add_argument("--device", default="cpu", help="where to run a checkpoint's model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the image encoder (0: library defaults)")
    p.set_defaults(fn=run_build)


def mine_target(
    target: str, overrides: list[str] | None, *, model: str, output: str, k: int, device: str = "cpu"
) -> dict[str, Any]:
    """Embed the training corpus with a model of a config (as built) or of a checkpoint (as
    trained), mine `k` negatives per sample and direction, save them to `output`."""
    trained = open_target(target, overrides, model=model)
    negatives = mine_negatives(trained.graph.models[model].to(device), model, trained.config.data, k=k, device=device)
    save_negatives(negatives, output)
    return negatives


def run_mine(args: argparse.Namespace) -> int:
    found = mine_target(args.target, args.overrides, model=args.model, output=args.output, k=args.k, device=args.device)
    print(f"wrote {args.output}: {len(found['keys'])} samples, {found['k']} negatives per sample and direction")
    return 0


def run_build(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        index, skipped = build_search_index(
            args.sources, model=args.model, output=args.output, batch_size=args.batch_size, dtype=args.dtype,
            thumb_size=args.thumb_size, faiss=args.faiss, device=args.device, data_args=args.data_arg,
            threads=args.threads or None, kind=args.kind, params=args.param,
        )  # fmt: skip
    n, d = index["embeddings"].shape
    search = index["search"]
    print(f"wrote {args.output}: {n} images x {d} ({args.dtype}), {index['embedder']}")
    params = " ".join(f"{k}={v}" for k, v in search["params"].items())
    built = f", built in {search['build_s']:.1f} s" if search["kind"] != "exact" else ""
    print(f"index kind: {search['kind']} {params or search['dtype']}{built} ({search['choice']})")
    if skipped.counts:
        print(f"skipped {skipped.summary()}")
    return 0
