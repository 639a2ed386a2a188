"""Index kinds: what `distill index build --kind` writes, and what a loaded index searches with.

| kind | stored | search | needs |
|---|---|---|---|
| `exact` | embeddings as float32, float16 or int8 (`--dtype`) | every row (`index_exact.ExactSearch`; `--faiss`: FAISS's flat scans) | nothing extra |
| `ivf_flat`, `ivf_pq`, `hnsw` | the same embeddings plus a serialised FAISS index | `index_ann.FaissSearch` | the faiss extra |

`auto` (the default) picks exact float32 search up to `AUTO_EXACT_BYTES` of float32 rows
(200K rows of width 128) and `AUTO_ANN` above, from the measurements in docs/deployment.md:
an exact query reads the whole matrix at the memory bandwidth (26 to 34 ms per 512 MB here),
so up to 100 MB it stays within 5 to 7 ms, exact and with nothing to build; above, IVF-flat
keeps recall@10 >= 0.99 at a sixth to an eighteenth of the search time, builds 7x faster than
HNSW and holds half its memory.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.deploy.index_ann import (
    ANN_KINDS,
    BUILD_PARAMS,
    QUERY_PARAMS,
    FaissSearch,
    build_faiss,
    check_keys,
    check_params,
    require_faiss,
)
from distill.deploy.index_exact import DTYPES, ExactSearch, FaissExact, encode
from distill.errors import ConfigError

KINDS = ("exact", *ANN_KINDS)
AUTO_EXACT_MAX = 200_000  # rows of width 128
AUTO_EXACT_BYTES = AUTO_EXACT_MAX * 128 * 4  # of float32 rows: wider rows, fewer of them
AUTO_ANN = "ivf_flat"


def check_kind(kind: str, dtype: str, given: dict[str, int], *, faiss: bool = False) -> list[str]:
    """The problems with build options known before embedding, one line each."""
    problems = []
    if kind not in ("auto", *KINDS):
        problems.append(f"--kind: must be auto or one of {', '.join(KINDS)}, got {kind!r}")
    if dtype not in DTYPES:
        problems.append(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if given and kind not in ANN_KINDS:
        problems.append(f"--param: only with --kind {'/'.join(ANN_KINDS)} (--kind {kind} takes none)")
    if faiss and kind in ANN_KINDS:
        problems.append(f"--faiss: an {kind} index is searched by FAISS anyway; --faiss chooses FAISS for exact indexes")
    if kind in ANN_KINDS:
        problems += check_keys(kind, given)
        require_faiss(f"--kind {kind}")
    return problems


def choose_kind(kind: str, n: int, dim: int) -> tuple[str, str]:
    """The kind to build for N rows of width D, and why (printed by `distill index build`)."""
    if kind != "auto":
        return kind, f"--kind {kind}"
    limit = max(1, AUTO_EXACT_BYTES // (4 * dim))
    if n <= limit:
        return "exact", f"auto: {n:,} images <= {limit:,}, exact search stays fast"
    try:
        require_faiss()
    except ConfigError:
        return "exact", f"auto: {n:,} images > {limit:,} would take {AUTO_ANN}, but faiss is not installed (pip install 'distill[faiss]')"
    return AUTO_ANN, f"auto: {n:,} images > {limit:,}, approximate search (--kind exact to keep exact)"


def build_fields(rows: torch.Tensor, *, kind: str, dtype: str, params: dict[str, int] | None = None,
                 seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """What an index file holds for its search: embeddings, int8 quant, the search record, the FAISS blob.

    Args:
        rows: (N, D) float32 unit rows.
        kind: One of `KINDS` (resolved from `auto` by `choose_kind`).
        dtype: Storage of the embeddings, one of `DTYPES`.
        params: Parameters of an approximate kind (defaults from N and D for the rest).
        seed: Of the IVF training sample.

    Raises:
        ConfigError: A parameter out of range for this N and D.
    """
    embeddings, quant = encode(rows, dtype)
    search: dict[str, Any] = {"kind": kind, "dtype": dtype, "params": {}, "build_s": 0.0}
    blob = torch.zeros(0, dtype=torch.uint8)
    if kind in ANN_KINDS:
        search["params"] = check_params(kind, params or {}, len(rows), rows.shape[1])
        build = {k: v for k, v in search["params"].items() if k in BUILD_PARAMS[kind]}
        blob, search["build_s"] = build_faiss(kind, rows, build, seed=seed)
    return {"embeddings": embeddings, "quant": quant, "search": search, "faiss": blob}


def searcher(data: dict[str, Any], *, backend: str, what: str, query: dict[str, int | None] | None = None) -> Any:
    """The search object of a loaded index: `ExactSearch`, `FaissExact` or `FaissSearch`.

    Args:
        data: The loaded index file.
        backend: "exact" (torch) or "faiss", for exact kinds.
        what: How messages name the index (`INDEX: 'x.idx'`).
        query: Query parameters (`nprobe`, `ef_search`, `rerank`) for approximate kinds.

    Raises:
        ConfigError: Query parameters an exact index does not take, faiss missing for an
            approximate index, or `--faiss` on int8.
    """
    search, stored, quant = data["search"], data["embeddings"], data["quant"]
    given = {k: v for k, v in (query or {}).items() if v is not None}
    if search["kind"] == "exact":
        if given:
            options = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            raise ConfigError(f"{options}: {what} is an exact index; only approximate ones (ivf_flat, ivf_pq, hnsw) take it")
        if backend == "exact":
            return ExactSearch(stored, quant if stored.dtype == torch.int8 else None)
        return FaissExact(require_faiss(), stored, quant if stored.dtype == torch.int8 else None)
    faiss = require_faiss(f"{what} (an {search['kind']} index)")
    found = FaissSearch(faiss, search["kind"], data["faiss"], search["params"], stored,
                        quant if stored.dtype == torch.int8 else None)  # fmt: skip
    found.set(**given)
    return found


def describe(search: dict[str, Any], backend: str, engine: Any) -> str:
    """How results name the search: `exact`, `exact float16`, `faiss`, `hnsw M=32 ef_search=64`."""
    if search["kind"] != "exact":
        return engine.describe()
    return backend + ("" if search["dtype"] == "float32" else f" {search['dtype']}")


__all__ = ["KINDS", "QUERY_PARAMS", "build_fields", "check_kind", "choose_kind", "describe", "searcher"]
