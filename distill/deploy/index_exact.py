"""Exact top-k over stored embeddings held as float32, float16 or int8.

The (N, D) rows are held transposed, (D, N) contiguous, so a query is one column-major
matrix-vector product (`torch.mv(T.t(), q)`: an axpy per dimension over contiguous
memory). On this 2-core CPU that reads a 1M x 128 float32 matrix in 26 ms, at the
memory bandwidth, where the row-major `torch.mv` takes 65 ms. float16 and int8 rows are
converted to float32 one block of `BLOCK` rows at a time, into one reused buffer: the whole
matrix is never expanded.

int8 has a scale and an offset per dimension, mapping the dimension's [min, max] onto
[-127, 127]: x[i, d] ~ scale[d] * codes[i, d] + offset[d]. Both fold into the query,
q . x_i ~ (q * scale) . codes_i + q . offset, and the last term is the same for every row,
so the search multiplies by integer codes alone, adds one constant to the k best, and the
scores are exactly those of the dequantised rows. (One scale per row, or a symmetric scale
per dimension, lost more recall on the demo student's embeddings: docs/deployment.md.)

Top-k over N scores is taken in two stages: the maximum of each group of `GROUP` scores,
the k groups with the largest maxima (together they hold every top-k score: a group that
holds one has a maximum at least the k-th score, and at most k groups do), then the top k
of those k * GROUP scores. 0.24 ms instead of 3.4 ms for `topk` over 1M scores.

`FaissExact` answers the same query with FAISS's flat scans, for `--faiss`: one pass that
decodes and multiplies, faster than the two passes here for float16 and int8 on a busy
machine (docs/deployment.md).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

DTYPES = ("float32", "float16", "int8")
BLOCK = 8192  # columns converted per step: 128 x 8192 float32 = 4 MB, within the L3 cache
GROUP = 1024  # scores per group of the two-stage top-k
QUERY_CHUNK = 16  # queries per batched product, bounding its (chunk, N) score block


def quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float rows -> int8 codes (N, D) and quant (2, D) float32: per-dimension scale and offset.

    Each dimension's range [min, max] is mapped onto [-127, 127]: rows ~ codes * scale + offset,
    with an error of at most scale / 2 per value.
    """
    rows = rows.to(torch.float32)
    low, high = rows.amin(dim=0), rows.amax(dim=0)
    scale = (high - low) / 254
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    offset = (high + low) / 2
    codes = torch.round((rows - offset) / scale).clamp_(-127, 127).to(torch.int8)
    return codes, torch.stack([scale, offset])


def dequantize(stored: torch.Tensor, quant: torch.Tensor | None = None) -> torch.Tensor:
    """Stored rows (float32, float16, or int8 codes with their quant) as float32."""
    rows = stored.to(torch.float32)
    return rows * quant[0] + quant[1] if stored.dtype == torch.int8 else rows


def encode(rows: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit float32 rows -> what an index stores: (embeddings in `dtype`, quant or an empty tensor)."""
    if dtype == "int8":
        return quantize_int8(rows)
    return rows.to(getattr(torch, dtype)).contiguous(), torch.zeros(0)


def top_k(scores: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of scores[:n], best first. `scores` has room for whole groups past n, all
    -inf (as `ExactSearch` keeps it)."""
    if n <= 32 * GROUP or k > n // GROUP:
        top = scores[:n].topk(k)
        return top.values, top.indices
    groups = scores[: len(scores) // GROUP * GROUP].view(-1, GROUP)
    best = groups.amax(dim=1).topk(k).indices
    top = groups[best].reshape(-1).topk(k)
    return top.values, best[top.indices // GROUP] * GROUP + top.indices % GROUP


class ExactSearch:
    """Brute-force inner-product search in torch over stored rows, one thread-safe query at a time.

    float32 rows are held as one (D, N) matrix; float16 and int8 rows as (N / BLOCK, D, BLOCK)
    blocks (the last one padded with zeros), each converted into the same float32 buffer
    before its product.

    Args:
        stored: (N, D) float32, float16 or int8 rows (int8: codes of `quantize_int8`).
        quant: (2, D) scale and offset of int8 codes; ignored otherwise.
    """

    def __init__(self, stored: torch.Tensor, quant: torch.Tensor | None = None) -> None:
        self.n, self.dim = stored.shape
        self.dtype = str(stored.dtype).removeprefix("torch.")
        if self.dtype not in DTYPES:
            raise ValueError(f"embeddings of dtype {self.dtype}; expected one of {', '.join(DTYPES)}")
        if self.dtype == "int8" and (quant is None or quant.shape != (2, self.dim)):
            raise ValueError(f"int8 embeddings need their (2, {self.dim}) scale and offset")
        self.quant = quant.to(torch.float32) if self.dtype == "int8" else None
        self.lock = threading.Lock()
        if self.dtype == "float32":
            self.t = stored.t().contiguous()  # (D, N), a copy in memory: see the module docstring
            self.blocks, self.buffer = None, None
            room = -(-self.n // GROUP) * GROUP
        else:
            self.width = min(BLOCK, self.n)
            count = -(-self.n // self.width)
            padded = torch.zeros(count * self.width, self.dim, dtype=stored.dtype)
            padded[: self.n] = stored
            self.blocks = padded.view(count, self.width, self.dim).transpose(1, 2).contiguous()
            self.buffer = torch.empty(self.dim, self.width)
            room = max(count * self.width, -(-self.n // GROUP) * GROUP)
        self.scores = torch.full((room,), -torch.inf)

    @property
    def nbytes(self) -> int:
        """Bytes held for the search: the rows, the score and conversion buffers."""
        rows = self.t if self.blocks is None else self.blocks
        extra = self.buffer.numel() * 4 if self.buffer is not None else 0
        return rows.numel() * rows.element_size() + self.scores.numel() * 4 + extra

    def rows(self) -> torch.Tensor:
        """The stored rows as float32 (N, D): a view for float32, else dequantised."""
        if self.blocks is None:
            return self.t.t()
        rows = self.blocks.transpose(1, 2).reshape(-1, self.dim)[: self.n]
        return dequantize(rows, self.quant)

    def _query(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The query as the codes are multiplied by, and the constant the offset adds to each score."""
        if self.quant is None:
            return q, 0.0
        return q * self.quant[0], q @ self.quant[1]

    def scores_of(self, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Scores of one (D,) query against every row, without int8's offset constant, into out[:N]."""
        if self.blocks is None:
            return torch.mv(self.t.t(), q, out=out[: self.n])
        for b, block in enumerate(self.blocks):
            self.buffer.copy_(block)
            torch.mv(self.buffer.t(), q, out=out[b * self.width : (b + 1) * self.width])
        out[self.n :] = -torch.inf
        return out[: self.n]

    def search(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k of (D,) or (Q, D) float32 queries: scores and row indices, best first."""
        if q.ndim == 1:
            scaled, constant = self._query(q)
            with self.lock:  # the score and conversion buffers are shared
                self.scores_of(scaled, self.scores)
                values, indices = top_k(self.scores, k, self.n)
                return (values + constant).numpy(), indices.numpy().copy()
        parts = [self._batch(q[i : i + QUERY_CHUNK], k) for i in range(0, len(q), QUERY_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _batch(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        scaled, constant = self._query(q)
        if self.blocks is None:
            top = (scaled @ self.t).topk(k, dim=1)
        else:
            scores = torch.empty(len(q), len(self.blocks) * self.width)
            for b, block in enumerate(self.blocks):
                torch.mm(scaled, block.to(torch.float32), out=scores[:, b * self.width : (b + 1) * self.width])
            top = scores[:, : self.n].topk(k, dim=1)
        values = top.values + (constant[:, None] if isinstance(constant, torch.Tensor) else constant)
        return values.numpy(), top.indices.numpy()


class FaissExact:
    """The same exact search through FAISS's flat scans, which decode and multiply in one pass:
    `IndexFlatIP` over float32 rows, `IndexScalarQuantizer` QT_fp16 over the same float16
    bytes, or QT_8bit_uniform over the int8 codes (byte c + 128 decoded as c, with the
    per-dimension scale and offset folded into the query as in `ExactSearch`).

    Not QT_8bit_direct or _direct_signed: their inner products are wrong for D >= 16 in
    faiss-cpu 1.15.1's AVX2 build.

    Args:
        faiss: The faiss module.
        stored: (N, D) float32, float16 or int8 rows.
        quant: (2, D) scale and offset of int8 codes.
    """

    def __init__(self, faiss: Any, stored: torch.Tensor, quant: torch.Tensor | None = None) -> None:
        self.n, self.dim = stored.shape
        self.quant = quant.to(torch.float32) if stored.dtype == torch.int8 else None
        if stored.dtype == torch.float32:
            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(np.ascontiguousarray(stored.numpy()))
            self.nbytes = self.n * self.dim * 4  # the vectors FAISS holds
            return
        if stored.dtype == torch.float16:
            qtype, codes = faiss.ScalarQuantizer.QT_fp16, np.ascontiguousarray(stored.numpy()).view(np.uint8)
        elif stored.dtype == torch.int8:
            qtype, codes = faiss.ScalarQuantizer.QT_8bit_uniform, (stored.numpy().astype(np.int16) + 128).astype(np.uint8)
        else:
            raise ValueError(f"embeddings of dtype {stored.dtype}; expected one of {', '.join(DTYPES)}")
        self.index = faiss.IndexScalarQuantizer(self.dim, qtype, faiss.METRIC_INNER_PRODUCT)
        if stored.dtype == torch.int8:  # decode byte u as vmin + (u + 0.5) / 255 * vdiff = u - 128
            faiss.copy_array_to_vector(np.array([-128.5, 255.0], np.float32), self.index.sq.trained)
            self.index.is_trained = True
        faiss.copy_array_to_vector(np.ascontiguousarray(codes).reshape(-1), self.index.codes)
        self.index.ntotal = self.n
        self.nbytes = self.n * self.index.code_size

    def search(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k of (D,) or (Q, D) float32 queries, as `ExactSearch.search`."""
        batch = q.reshape(-1, self.dim)
        constant = np.zeros((len(batch), 1), np.float32)
        if self.quant is not None:
            constant = (batch @ self.quant[1]).numpy()[:, None]
            batch = batch * self.quant[0]
        scores, indices = self.index.search(np.ascontiguousarray(batch.numpy()), k)
        scores = scores + constant
        return (scores[0], indices[0]) if q.ndim == 1 else (scores, indices)
