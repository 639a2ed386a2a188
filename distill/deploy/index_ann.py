"""Approximate search through FAISS: IVF-flat, IVF-PQ and HNSW, their parameters and query knobs.

| kind | FAISS index | what a query does |
|---|---|---|
| `ivf_flat` | `IVF{nlist},Flat`: k-means into nlist lists of whole vectors | scores the nlist centroids, scans the `nprobe` best lists exactly |
| `ivf_pq` | `IVF{nlist},PQ{m}x{nbits}`: the same lists, each vector an m-byte product-quantizer code of its residual | scans the `nprobe` best lists by code, then re-scores the best `rerank` exactly from the stored embeddings |
| `hnsw` | `HNSW{M}`: a graph of whole vectors, M links per node, built with `ef_construction` | walks the graph keeping the `ef_search` best candidates |

Parameters not given are chosen from the index size N and the width D (`default_params`);
the rules and the measurements behind them are in docs/deployment.md. IVF kinds are trained
on a seeded random sample of `train_size` rows. FAISS is an optional extra: `require_faiss`
turns its absence into one line naming it.
"""

from __future__ import annotations

import difflib
import math
import time
from typing import Any

import numpy as np
import torch

from distill.deploy.index_exact import dequantize
from distill.errors import ConfigError

ANN_KINDS = ("ivf_flat", "ivf_pq", "hnsw")
BUILD_PARAMS = {
    "ivf_flat": ("nlist", "train_size"),
    "ivf_pq": ("nlist", "train_size", "m", "nbits"),
    "hnsw": ("M", "ef_construction"),
}
QUERY_PARAMS = {"ivf_flat": ("nprobe",), "ivf_pq": ("nprobe", "rerank"), "hnsw": ("ef_search",)}
OPTIONS = {"nprobe": "--nprobe", "rerank": "--rerank", "ef_search": "--ef-search"}
EXTRA = "pip install 'distill[faiss]' (or pip install faiss-cpu)"
# Chosen from benchmarks/index_kinds.py at 100K and 1M rows: the smallest settings with
# recall@10 >= 0.99 of exact float32 on the embedded benchmark's embeddings (docs/deployment.md).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 64
TRAIN_PER_LIST = 64  # training rows per IVF list (FAISS warns below 39)
PQ_TRAIN_PER_CENTROID = 64  # rows per code-book entry (FAISS's default, 256, is 4x the rows and the time)
PQ_RERANK = 200  # IVF-PQ candidates re-scored exactly
KMEANS_ITERATIONS = 10  # of the IVF and PQ k-means (FAISS's default, 25, is 2.5x the training time)


def require_faiss(what: str = "--faiss") -> Any:
    """The `faiss` module, or a one-line error naming the extra that installs it.

    Args:
        what: What needs it, leading the message (`--kind hnsw`, `INDEX: 'x.idx' (an hnsw index)`).
    """
    try:
        import faiss  # faiss: optional extra (faiss-cpu)
    except ImportError as e:
        if what == "--faiss":  # kept word for word: scripts match on it
            raise ConfigError("--faiss: the faiss package is not installed (pip install faiss-cpu); it is the extra "
                              "distill[faiss]; without --faiss the exact torch search needs nothing extra") from e  # fmt: skip
        raise ConfigError(f"{what}: needs the faiss package, which is not installed: {EXTRA}") from e
    return faiss


def default_params(kind: str, n: int, dim: int, given: dict[str, int] | None = None) -> dict[str, int]:
    """Build and query parameters of `kind` for N rows of width D: `given` ones, the rest chosen.

    The query defaults are the smallest settings that reached recall@10 >= 0.99 of exact
    float32 at both 100K and 1M rows (docs/deployment.md); powers of two throughout.

    - IVF: nlist ~ 2 sqrt(N), at most N / 39 (FAISS's minimum of training rows per list);
      train_size = min(N, 64 nlist); nprobe ~ sqrt(2 nlist) (32 of 512 lists at 100K, 64 of
      2048 at 1M).
    - IVF-PQ: m = the largest divisor of D up to D / 4 (32 bytes a row for D = 128), nbits = 8
      (fewer for small N: 2^nbits centroids need 39 rows each); rerank = 200.
    - HNSW: M = 32, ef_construction = 40; ef_search ~ 64 (N / 100K)^0.6, at least 16 (64 at
      100K, 256 at 1M).
    """
    given = given or {}
    if kind == "hnsw":
        ef = max(16, power_of_two(HNSW_EF_SEARCH * (n / 100_000) ** 0.6))
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef, **given}
    nlist = given.get("nlist") or max(1, min(power_of_two(2 * math.sqrt(n)), n // 39))
    nprobe = min(nlist, 2 ** math.ceil(math.log2(math.sqrt(2 * nlist))))
    params = {"nlist": nlist, "train_size": min(n, TRAIN_PER_LIST * nlist), "nprobe": nprobe}
    if kind == "ivf_pq":
        train = given.get("train_size", params["train_size"])
        m = max(x for x in range(1, max(1, dim // 4) + 1) if dim % x == 0)
        params.update(m=m, nbits=max(1, min(8, int(math.log2(max(2, train // 39))))), rerank=PQ_RERANK)
    return {**params, **given}


def power_of_two(x: float) -> int:
    """The power of two nearest x (in log scale), at least 1."""
    return 2 ** max(0, round(math.log2(max(1.0, x))))


def check_keys(kind: str, given: dict[str, int], *, what: str = "--param") -> list[str]:
    """The problems with `given` parameters of `kind` that do not depend on the size, one line each."""
    allowed = BUILD_PARAMS[kind] + QUERY_PARAMS[kind]
    problems = []
    for key, value in given.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{what} {key}: not a parameter of an {kind} index (it takes {', '.join(allowed)}){hint}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "rerank" else 1):
            problems.append(f"{what} {key}: must be an integer >= {0 if key == 'rerank' else 1}, got {value!r}")
    return problems


def check_params(kind: str, given: dict[str, int], n: int, dim: int, *, what: str = "--param") -> dict[str, int]:
    """`default_params` with `given` applied, each checked: one line per bad key or value.

    Raises:
        ConfigError: An unknown key (with a did-you-mean) or a value out of range.
    """
    problems = check_keys(kind, given, what=what)
    if problems:
        raise ConfigError(problems)
    params = default_params(kind, n, dim, given)
    if "nlist" in params and params["nlist"] > n:
        problems.append(f"{what} nlist: {params['nlist']} lists for {n} rows; at most one list per row")
    elif "train_size" in params and not params["nlist"] <= params["train_size"] <= n:
        problems.append(f"{what} train_size: must be between nlist ({params['nlist']}) and the {n} rows, got {params['train_size']}")
    if kind == "ivf_pq":
        if dim % params["m"]:
            problems.append(f"{what} m: {params['m']} does not divide the embedding width {dim}")
        if params["nbits"] > 16 or 2 ** params["nbits"] > params["train_size"]:
            problems.append(f"{what} nbits: {params['nbits']} needs at least {2 ** params['nbits']} training rows "
                            f"(and at most 16 bits); train_size is {params['train_size']}")  # fmt: skip
    if problems:
        raise ConfigError(problems)
    return params


def factory_string(kind: str, params: dict[str, int]) -> str:
    """The `faiss.index_factory` description of a kind."""
    if kind == "ivf_flat":
        return f"IVF{params['nlist']},Flat"
    if kind == "ivf_pq":  # np: no polysemous training (for Hamming filtering, unused; it made training 30x slower)
        return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}np"
    return f"HNSW{params['M']}"


def build_faiss(kind: str, rows: torch.Tensor, params: dict[str, int], *, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Train (IVF: on a seeded sample) and fill a FAISS index with float32 unit rows.

    Returns:
        The serialised index as a uint8 tensor and the build time in seconds.
    """
    faiss = require_faiss(f"--kind {kind}")
    start = time.perf_counter()
    vectors = np.ascontiguousarray(rows.to(torch.float32).numpy())
    index = faiss.index_factory(vectors.shape[1], factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        faiss.extract_index_ivf(index).cp.niter = KMEANS_ITERATIONS
        if kind == "ivf_pq":
            index.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
            index.pq.cp.niter = KMEANS_ITERATIONS
        sample = np.random.default_rng(seed).choice(len(vectors), params["train_size"], replace=False)
        index.train(vectors[np.sort(sample)])
    for i in range(0, len(vectors), 65536):  # in chunks: IVF-PQ encodes a float copy of what it adds
        index.add(vectors[i : i + 65536])
    blob = faiss.serialize_index(index)
    return torch.from_numpy(blob), time.perf_counter() - start


class FaissSearch:
    """A loaded approximate index, answering queries with its query parameters.

    Args:
        faiss: The faiss module.
        kind: One of `ANN_KINDS`.
        blob: The serialised index (`build_faiss`).
        params: Build and query parameters recorded in the index file.
        stored: (N, D) stored embeddings (read for IVF-PQ's re-ranking only).
        quant: The scale and offset of int8 rows.
    """

    def __init__(self, faiss: Any, kind: str, blob: torch.Tensor, params: dict[str, int],
                 stored: torch.Tensor, quant: torch.Tensor | None = None) -> None:  # fmt: skip
        self.faiss, self.kind = faiss, kind
        self.index = faiss.deserialize_index(np.ascontiguousarray(blob.numpy()))
        self.n, self.dim = stored.shape
        self.stored, self.quant = stored, quant
        self.nbytes = int(blob.numel())  # the serialised arrays: what FAISS holds in memory
        self.params = dict(params)

    def set(self, **query: int | None) -> None:
        """Set query parameters (`nprobe`, `ef_search`, `rerank`; None: keep).

        Raises:
            ConfigError: A parameter this kind does not take, or a bad value, one line naming the option.
        """
        problems = []
        for key, value in query.items():
            if value is None:
                continue
            option = OPTIONS.get(key, key)
            if key not in QUERY_PARAMS[self.kind]:
                takes = " and ".join(OPTIONS[k] for k in QUERY_PARAMS[self.kind])
                problems.append(f"{option}: does not apply to an {self.kind} index (it takes {takes})")
            elif value < (0 if key == "rerank" else 1):
                problems.append(f"{option}: must be at least {0 if key == 'rerank' else 1}, got {value}")
            elif key == "nprobe" and value > self.params["nlist"]:
                problems.append(f"{option}: {value} is more than the index's {self.params['nlist']} lists")
            else:
                self.params[key] = value
        if problems:
            raise ConfigError(problems)

    def describe(self) -> str:
        """The kind and its parameters, e.g. `hnsw M=32 ef_search=64`."""
        return " ".join([self.kind, *(f"{k}={v}" for k, v in self.params.items() if k != "train_size")])

    def _search_params(self) -> Any:
        if self.kind == "hnsw":
            return self.faiss.SearchParametersHNSW(efSearch=self.params["ef_search"])
        return self.faiss.SearchParametersIVF(nprobe=self.params["nprobe"])

    def search(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k of (D,) or (Q, D) float32 queries, best first. A (D,) query gets only the
        results found (fewer than k when the probed lists hold fewer); a batch is padded
        with index -1 and score -inf."""
        batch = np.ascontiguousarray(q.reshape(-1, self.dim).numpy())
        rerank = self.params.get("rerank", 0)
        fetch = min(self.n, max(k, rerank)) if rerank else k
        scores, indices = self.index.search(batch, fetch, params=self._search_params())
        if rerank:
            scores, indices = self._rerank(batch, indices, k)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        if q.ndim == 1:
            found = indices[0] >= 0
            return scores[0][found], indices[0][found]
        return scores, indices

    def _rerank(self, batch: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates exactly against the stored rows; keep the best k."""
        out_s = np.full((len(batch), k), -np.inf, np.float32)
        out_i = np.full((len(batch), k), -1, np.int64)
        for r, (query, cand) in enumerate(zip(batch, candidates)):
            cand = np.sort(cand[cand >= 0])  # in file order: the memory-mapped rows are read forwards
            exact = dequantize(self.stored[torch.from_numpy(cand)], self.quant).numpy() @ query
            best = np.argsort(-exact, kind="stable")[:k]
            out_s[r, : len(best)], out_i[r, : len(best)] = exact[best], cand[best]
        return out_s, out_i
