"""The search index: image embeddings of a folder, shards or a dataset split, in one file.

`distill index build SOURCE --model EMBEDDER --output FILE` writes one `torch.save` file of
plain containers and tensors (loadable with `weights_only=True`, memory-mapped):

    version        1
    kind           "distill-search-index"
    model          the embedder's path (absolute; `path.ckpt:model` for a checkpoint):
                   `distill search` and `distill serve` encode queries with it
    embedder       its one-line description
    embed_dim      D
    backend        "exact" (torch) or "faiss" (IndexFlatIP), the default for search and serve
    sources        the SOURCE arguments
    embeddings     (N, D) float32 or float16, L2-normalised rows
    ids            N ids (relative path or sample key)
    locations      N places to read each image back (path, `<shard>#<member>` or ``)
    captions       N captions stored with the images (`` for a plain folder)
    thumbs         (T,) uint8: the JPEG thumbnails, concatenated (T = 0 without thumbnails)
    thumb_offsets  (N + 1,) int64: thumbnail i is thumbs[offsets[i]:offsets[i + 1]]
    skipped        reason -> images that could not be read

Search is exact: one matrix-vector product over a contiguous float32 copy of the
embeddings and a top-k (`torch.mv` + `torch.topk`), or FAISS's exact inner-product index
when asked for and installed.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from distill.deploy.embedders import Embedder, describe
from distill.deploy.sources import Item, Skipped, Source, read_image
from distill.errors import ConfigError
from distill.io import atomic_path

VERSION = 1
KIND = "distill-search-index"
FIELDS = ("version", "kind", "model", "embedder", "embed_dim", "backend", "sources", "embeddings",
          "ids", "locations", "captions", "thumbs", "thumb_offsets", "skipped")  # fmt: skip
BACKENDS = ("exact", "faiss")


def thumbnail(image: Image.Image, size: int) -> bytes:
    """JPEG bytes of `image` shrunk to fit in size x size (aspect kept)."""
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def require_faiss() -> Any:
    """The `faiss` module, or a one-line error saying how to get it."""
    try:
        import faiss  # faiss: optional extra (faiss-cpu)
    except ImportError as e:
        raise ConfigError("--faiss: the faiss package is not installed (pip install faiss-cpu); without --faiss the exact torch search needs nothing extra") from e
    return faiss


def index_images(
    sources: Sequence[Source],
    embedder: Embedder,
    *,
    model: str,
    names: Sequence[str] = (),
    batch_size: int = 64,
    dtype: str = "float32",
    thumb_size: int = 128,
    backend: str = "exact",
    progress: bool = True,
) -> tuple[dict[str, Any], Skipped]:
    """Embed every readable image of `sources` with `embedder` in batches.

    Args:
        sources: Parsed SOURCE arguments (`distill.deploy.sources.parse_source`).
        embedder: Encodes the images; its `describe()` is recorded.
        model: The embedder's path spec, recorded for `distill search` and `distill serve`.
        names: The SOURCE arguments as given, recorded.
        batch_size: Images per `encode_images` call.
        dtype: "float32" or "float16" storage of the embeddings.
        thumb_size: Side of the stored JPEG thumbnails; 0 stores none.
        backend: Default search backend recorded in the index ("exact" or "faiss").
        progress: Show a tqdm bar.

    Returns:
        The index (the fields of the module docstring) and what was skipped.

    Raises:
        ConfigError: If no image could be read, or an argument is out of range.
    """
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"--dtype: must be float32 or float16, got {dtype!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    skipped = Skipped()
    ids: list[str] = []
    locations: list[str] = []
    captions: list[str] = []
    thumbs: list[bytes] = []
    chunks: list[np.ndarray] = []
    total = sum(len(s) for s in sources) if all(hasattr(s, "__len__") for s in sources) else None
    bar = tqdm(total=total, desc="embedding images", unit="img", disable=not progress)

    def flush(batch: list[Item]) -> None:
        vectors = np.asarray(embedder.encode_images([it.image for it in batch]), dtype=np.float32)
        if vectors.shape != (len(batch), embedder.embed_dim):
            raise ValueError(f"{describe(embedder)} returned shape {vectors.shape} for {len(batch)} images")
        chunks.append(vectors)
        bar.update(len(batch))
        batch.clear()

    batch: list[Item] = []
    for source in sources:
        for item in source.items(skipped):
            ids.append(item.id)
            locations.append(item.location)
            captions.append(item.caption)
            thumbs.append(thumbnail(item.image, thumb_size) if thumb_size > 0 else b"")
            batch.append(item)
            if len(batch) == batch_size:
                flush(batch)
    if batch:
        flush(batch)
    bar.close()
    if not ids:
        why = f": skipped {skipped.summary()}" if skipped.counts else ""
        raise ConfigError(f"SOURCE: no readable image in {', '.join(names) or 'the sources'}{why}")
    embeddings = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(chunks)), dim=1)
    offsets = np.cumsum([0] + [len(t) for t in thumbs], dtype=np.int64)
    blob = bytearray(b"".join(thumbs))
    index = {
        "version": VERSION, "kind": KIND, "model": model, "embedder": describe(embedder),
        "embed_dim": int(embedder.embed_dim), "backend": backend, "sources": list(names),
        "embeddings": embeddings.to(getattr(torch, dtype)), "ids": ids, "locations": locations,
        "captions": captions,
        "thumbs": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
        "thumb_offsets": torch.from_numpy(offsets), "skipped": dict(skipped.counts),
    }  # fmt: skip
    return index, skipped


def save_search_index(index: dict[str, Any], path: str | Path) -> Path:
    """Write a search index atomically (`distill.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save({k: index[k] for k in FIELDS}, tmp)
    return Path(path)


def load_search_index(path: str | Path) -> dict[str, Any]:
    """Read a search index written by `save_search_index` (tensors memory-mapped).

    Raises:
        ConfigError: If the file is missing or is not a search index.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"INDEX: {str(path)!r} does not exist; build it with `distill index build`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch zip file, or one holding arbitrary objects
        raise ConfigError(f"INDEX: {str(path)!r} is not a distill search index ({type(e).__name__})") from e
    if isinstance(data, dict) and data.get("kind") != KIND and ("i2t" in data or data.get("kind") == "distill-negatives"):
        raise ConfigError(f"INDEX: {str(path)!r} holds mined negatives (`distill index mine`), not a search index")
    missing = [f for f in FIELDS if f not in data] if isinstance(data, dict) else list(FIELDS)
    if missing or data.get("kind") != KIND:
        raise ConfigError(f"INDEX: {str(path)!r} is not a distill search index (missing {', '.join(missing) or 'kind'})")
    return data


class SearchIndex:
    """A loaded index, ready to answer queries.

    Args:
        data: What `load_index` returns.
        backend: "exact" or "faiss"; default the one recorded in the index.
        path: The file it came from (for messages).
    """

    def __init__(self, data: dict[str, Any], *, backend: str | None = None, path: str | Path = "") -> None:
        self.data, self.path = data, Path(path)
        self.backend = backend or data["backend"]
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        self.ids: list[str] = data["ids"]
        self.locations: list[str] = data["locations"]
        self.captions: list[str] = data["captions"]
        self.model: str = data["model"]
        self.embedder: str = data["embedder"]
        self.embed_dim = int(data["embed_dim"])
        # One contiguous float32 copy in memory: fp16 matrix-vector products are slower on CPUs,
        # and a memory-mapped matrix would page in on the first queries.
        self.matrix = data["embeddings"].to(torch.float32, copy=True).contiguous()
        self._scores = torch.empty(len(self.ids), dtype=torch.float32)
        self._lock = threading.Lock()
        self._faiss = None
        if self.backend == "faiss":
            faiss = require_faiss()
            self._faiss = faiss.IndexFlatIP(self.embed_dim)
            self._faiss.add(self.matrix.numpy())

    @classmethod
    def open(cls, path: str | Path, *, backend: str | None = None) -> SearchIndex:
        """Load an index file."""
        return cls(load_search_index(path), backend=backend, path=path)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k best items for each query by inner product, best first.

        Args:
            queries: (D,) or (Q, D) float32 unit vectors.
            k: Results per query (capped at the index size).

        Returns:
            scores (Q, k) float32 and indices (Q, k) int64 (a (k,) pair for a (D,) query).
        """
        q = torch.as_tensor(queries, dtype=torch.float32)
        if q.shape[-1] != self.embed_dim:
            raise ValueError(f"query dimension {q.shape[-1]} != index dimension {self.embed_dim}")
        k = max(1, min(int(k), len(self)))
        if self._faiss is not None:
            scores, idx = self._faiss.search(np.ascontiguousarray(q.reshape(-1, self.embed_dim).numpy()), k)
            return (scores[0], idx[0]) if q.ndim == 1 else (scores, idx)
        if q.ndim == 1:
            with self._lock:  # the score buffer is shared; one query at a time
                top = torch.mv(self.matrix, q, out=self._scores).topk(k)
                return top.values.numpy().copy(), top.indices.numpy()
        top = (q @ self.matrix.t()).topk(k, dim=1)
        return top.values.numpy(), top.indices.numpy()

    def thumbnail(self, i: int) -> bytes | None:
        """Item i's stored JPEG thumbnail, or None when the index has none."""
        offsets = self.data["thumb_offsets"]
        start, end = int(offsets[i]), int(offsets[i + 1])
        return bytes(self.data["thumbs"][start:end].numpy()) if end > start else None

    def image(self, i: int) -> Image.Image | None:
        """Item i as a PIL image: its thumbnail, else read back from its location; None if gone."""
        data = self.thumbnail(i)
        if data is not None:
            return Image.open(io.BytesIO(data)).convert("RGB")
        return read_image(self.locations[i])

    def image_jpeg(self, i: int, size: int = 256) -> bytes | None:
        """JPEG bytes to show item i: the thumbnail, else the source image shrunk to `size`."""
        data = self.thumbnail(i)
        if data is not None:
            return data
        image = read_image(self.locations[i])
        return thumbnail(image, size) if image is not None else None
