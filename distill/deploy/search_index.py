"""The search index: image embeddings of a folder, shards or a dataset split, in one file.

`distill index build SOURCE --model EMBEDDER --output FILE` writes one `torch.save` file of
plain containers and tensors (loadable with `weights_only=True`, memory-mapped):

    version        2 (1: before index kinds; read as an exact index of its dtype)
    kind           "distill-search-index"
    model          the embedder's path (absolute; `path.ckpt:model` for a checkpoint):
                   `distill search` and `distill serve` encode queries with it
    embedder       its one-line description
    embed_dim      D
    backend        "exact" (torch) or "faiss": the default for an exact index ("faiss" for the others)
    sources        the SOURCE arguments
    embeddings     (N, D) float32, float16 or int8 codes of the L2-normalised rows
    quant          (2, D) float32: int8 row i is embeddings[i] * quant[0] + quant[1] (empty otherwise)
    search         {"kind": exact | ivf_flat | ivf_pq | hnsw, "dtype", "params": build and
                   query parameters, "build_s": seconds to train and fill the FAISS index,
                   "choice": why this kind}
    faiss          (B,) uint8: the serialised FAISS index of an approximate kind (B = 0 for exact)
    ids            N ids (relative path or sample key)
    locations      N places to read each image back (path, `<shard>#<member>` or ``)
    captions       N captions stored with the images (`` for a plain folder)
                   (these three as lists in memory; in the file {"utf8": uint8, "offsets": (N + 1,)
                   int64}: unpickling a million strings with `weights_only` takes 15 s, this 0.2 s)
    thumbs         (T,) uint8: the JPEG thumbnails, concatenated (T = 0 without thumbnails)
    thumb_offsets  (N + 1,) int64: thumbnail i is thumbs[offsets[i]:offsets[i + 1]]
    skipped        reason -> images that could not be read

The kinds and how each is searched: `distill.deploy.index_kinds`. An approximate index
keeps the embeddings too (memory-mapped, read only to re-rank IVF-PQ candidates), so it can
be rebuilt as another kind without re-embedding (`rebuild_index`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from distill.deploy import index_kinds
from distill.deploy.embedders import Embedder, describe
from distill.deploy.index_ann import require_faiss
from distill.deploy.index_exact import ExactSearch, dequantize
from distill.deploy.sources import Item, Skipped, Source, read_image
from distill.errors import ConfigError
from distill.io import atomic_path

VERSION = 2
KIND = "distill-search-index"
FIELDS = ("version", "kind", "model", "embedder", "embed_dim", "backend", "sources", "embeddings",
          "ids", "locations", "captions", "thumbs", "thumb_offsets", "skipped")  # fmt: skip
SEARCH_FIELDS = ("quant", "search", "faiss")  # version 2
TEXT_FIELDS = ("ids", "locations", "captions")
BACKENDS = ("exact", "faiss")
__all__ = ["SearchIndex", "index_images", "load_search_index", "rebuild_index", "require_faiss", "save_search_index"]


def thumbnail(image: Image.Image, size: int) -> bytes:
    """JPEG bytes of `image` shrunk to fit in size x size (aspect kept)."""
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


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
    kind: str = "auto",
    params: dict[str, int] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], Skipped]:
    """Embed every readable image of `sources` with `embedder` in batches, then index them.

    Args:
        sources: Parsed SOURCE arguments (`distill.deploy.sources.parse_source`).
        embedder: Encodes the images; its `describe()` is recorded.
        model: The embedder's path spec, recorded for `distill search` and `distill serve`.
        names: The SOURCE arguments as given, recorded.
        batch_size: Images per `encode_images` call.
        dtype: Storage of the embeddings: "float32", "float16" or "int8".
        thumb_size: Side of the stored JPEG thumbnails; 0 stores none.
        backend: Default search backend of an exact index ("exact" or "faiss").
        kind: "auto" or one of `index_kinds.KINDS`.
        params: Parameters of an approximate kind (the rest chosen from the size).
        progress: Show a tqdm bar.

    Returns:
        The index (the fields of the module docstring) and what was skipped.

    Raises:
        ConfigError: If no image could be read, or an argument is out of range.
    """
    problems = index_kinds.check_kind(kind, dtype, params or {}, faiss=backend == "faiss")
    if backend not in BACKENDS:
        problems.append(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if batch_size < 1:
        problems.append(f"--batch-size: must be >= 1, got {batch_size}")
    if problems:
        raise ConfigError(problems)
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
        "ids": ids, "locations": locations, "captions": captions,
        "thumbs": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
        "thumb_offsets": torch.from_numpy(offsets), "skipped": dict(skipped.counts),
    }  # fmt: skip
    return rebuild_index(index, embeddings, kind=kind, dtype=dtype, params=params), skipped


def rebuild_index(index: dict[str, Any], rows: torch.Tensor | None = None, *, kind: str = "auto", dtype: str = "float32",
                  params: dict[str, int] | None = None, backend: str | None = None, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """`index` with its search fields (re)built as another kind: nothing is re-embedded.

    Args:
        index: An index (loaded, or being built); its other fields are kept.
        rows: (N, D) float32 unit rows; default the index's own embeddings, dequantised.
        kind: "auto" or one of `index_kinds.KINDS`.
        dtype: Storage of the embeddings.
        params: Parameters of an approximate kind.
        backend: Default backend of an exact index; default the index's own (an exact one's).
        seed: Of the IVF training sample.

    Raises:
        ConfigError: A bad kind, dtype or parameter.
    """
    if rows is None:
        rows = dequantize(index["embeddings"], index.get("quant"))
    was_exact = index.get("search", {"kind": "exact"})["kind"] == "exact"
    backend = backend or (index.get("backend", "exact") if was_exact else "exact")
    problems = index_kinds.check_kind(kind, dtype, params or {}, faiss=backend == "faiss")
    if problems:
        raise ConfigError(problems)
    chosen, why = index_kinds.choose_kind(kind, len(rows), rows.shape[1])
    fields = index_kinds.build_fields(rows, kind=chosen, dtype=dtype, params=params, seed=seed)
    fields["search"]["choice"] = why
    return {**index, **fields, "version": VERSION, "backend": "faiss" if chosen != "exact" else backend}


def save_search_index(index: dict[str, Any], path: str | Path) -> Path:
    """Write a search index atomically (`distill.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save({k: pack_texts(index[k]) if k in TEXT_FIELDS else compact(index[k]) for k in FIELDS + SEARCH_FIELDS}, tmp)
    return Path(path)


def pack_texts(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Strings as one UTF-8 byte tensor and their (N + 1,) byte offsets."""
    encoded = [t.encode() for t in texts]
    blob = bytearray(b"".join(encoded))
    offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    return {"utf8": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
            "offsets": torch.from_numpy(offsets)}  # fmt: skip


def unpack_texts(packed: dict[str, torch.Tensor] | list[str]) -> list[str]:
    """`pack_texts` undone (a version 1 list passes through)."""
    if isinstance(packed, list):
        return packed
    data, offsets = packed["utf8"].numpy().tobytes(), packed["offsets"].tolist()
    if data.isascii():  # one decode, then slices: byte and character offsets agree
        text = data.decode("ascii")
        return [text[a:b] for a, b in zip(offsets, offsets[1:])]
    return [data[a:b].decode() for a, b in zip(offsets, offsets[1:])]


def compact(value: Any) -> Any:
    """A tensor that is a view of a larger one, copied: `torch.save` writes a view's whole storage."""
    if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
        return value.contiguous().clone()
    return value


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
    if data["version"] > VERSION:
        raise ConfigError(f"INDEX: {str(path)!r} is a version {data['version']} index; this distill reads up to {VERSION}")
    return with_search_fields({**data, **{k: unpack_texts(data[k]) for k in TEXT_FIELDS}})


def with_search_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 index (no kinds yet) as version 2: an exact index of its stored dtype."""
    if all(f in data for f in SEARCH_FIELDS):
        return data
    dtype = str(data["embeddings"].dtype).removeprefix("torch.")
    search = {"kind": "exact", "dtype": dtype, "params": {}, "build_s": 0.0, "choice": f"version {data['version']} index"}
    return {"quant": torch.zeros(0), "search": search, "faiss": torch.zeros(0, dtype=torch.uint8), **data}


class SearchIndex:
    """A loaded index, ready to answer queries.

    Args:
        data: What `load_search_index` returns (or `index_images`).
        backend: "exact" or "faiss" for an exact index; default the one recorded in it.
        path: The file it came from (for messages).
        nprobe: Lists an IVF index scans per query (default: recorded at build).
        ef_search: Candidates an HNSW query keeps (default: recorded).
        rerank: IVF-PQ candidates re-scored exactly (default: recorded; 0: none).

    Raises:
        ConfigError: A bad backend, a query parameter the kind does not take, or faiss missing.
    """

    def __init__(self, data: dict[str, Any], *, backend: str | None = None, path: str | Path = "",
                 nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None) -> None:  # fmt: skip
        self.data, self.path = with_search_fields(data), Path(path)
        what = f"INDEX: {str(path)!r}" if str(path) else "the index"
        self.kind: str = self.data["search"]["kind"]
        self.dtype: str = self.data["search"]["dtype"]
        self.backend = backend or self.data["backend"]
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.kind != "exact":
            self.backend = "faiss"
        self.ids: list[str] = self.data["ids"]
        self.locations: list[str] = self.data["locations"]
        self.captions: list[str] = self.data["captions"]
        self.model: str = self.data["model"]
        self.embedder: str = self.data["embedder"]
        self.embed_dim = int(self.data["embed_dim"])
        query = {"nprobe": nprobe, "ef_search": ef_search, "rerank": rerank}
        self.engine = index_kinds.searcher(self.data, backend=self.backend, what=what, query=query)

    @classmethod
    def open(cls, path: str | Path, **options: Any) -> SearchIndex:
        """Load an index file; `options` as the constructor's (backend, nprobe, ef_search, rerank)."""
        return cls(load_search_index(path), path=path, **options)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> torch.Tensor:
        """The (N, D) rows as float32: a view of a float32 exact index's search copy, else dequantised."""
        if isinstance(self.engine, ExactSearch) and self.engine.dtype == "float32":
            return self.engine.rows()
        return dequantize(self.data["embeddings"], self.data["quant"])

    @property
    def nbytes(self) -> int:
        """Bytes the search holds in memory (rows or codes, graph or lists, buffers)."""
        return int(self.engine.nbytes)

    def describe(self) -> str:
        """The search in a few words: `exact`, `exact int8`, `faiss`, `hnsw M=32 ef_search=64`."""
        return index_kinds.describe(self.data["search"], self.backend, self.engine)

    def set_query(self, **params: int | None) -> None:
        """Change query parameters of an approximate index (`nprobe`, `ef_search`, `rerank`)."""
        if self.kind == "exact":
            raise ConfigError(f"{', '.join(params)}: an exact index takes no query parameters")
        self.engine.set(**params)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k best items for each query by inner product, best first.

        Args:
            queries: (D,) or (Q, D) float32 unit vectors.
            k: Results per query (capped at the index size).

        Returns:
            scores (Q, k) float32 and indices (Q, k) int64 (a (k,) pair for a (D,) query; an
            approximate index may find fewer, and pads a batch with index -1).
        """
        q = torch.as_tensor(queries, dtype=torch.float32)
        if q.shape[-1] != self.embed_dim:
            raise ValueError(f"query dimension {q.shape[-1]} != index dimension {self.embed_dim}")
        k = max(1, min(int(k), len(self)))
        return self.engine.search(q, k)

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
