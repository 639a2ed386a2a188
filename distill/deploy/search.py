"""`distill index build` and `distill search`: build an index, answer a text query, draw the top images.

    distill index build photos/ --model export/ --output photos.idx [--kind hnsw --param M=32]
    distill search photos.idx "a red circle left of a blue square" -k 10 --sheet top.png [--ef-search 128]

A query is encoded by the embedder that built the index (its path is recorded in the index)
unless `--model` names another one of the same embedding dimension.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from distill.deploy import index_kinds
from distill.deploy.embedders import Embedder, load_embedder, resolve_spec
from distill.deploy.index_ann import require_faiss
from distill.deploy.search_index import SearchIndex, index_images, save_search_index
from distill.deploy.sources import DatasetSource, Skipped, parse_source
from distill.errors import ConfigError


def parse_data_args(pairs: list[str] | None) -> dict[str, Any]:
    """`["n_test=100", "root=/data"]` -> {"n_test": 100, "root": "/data"} (values read as YAML)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--data-arg: expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def parse_params(pairs: list[str] | None) -> dict[str, int]:
    """`["nlist=4096", "M=32"]` -> {"nlist": 4096, "M": 32}: the `--param` values of an index kind."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ConfigError(f"--param {key}: must be an integer, got {value!r}") from None
    return out


def build_search_index(
    sources: list[str], *, model: str, output: str, batch_size: int = 64, dtype: str = "float32",
    thumb_size: int = 128, faiss: bool = False, device: str = "cpu", data_args: list[str] | None = None,
    threads: int | None = None, kind: str = "auto", params: list[str] | None = None, progress: bool = True,
) -> tuple[dict[str, Any], Skipped]:
    """`distill index build`: check every argument, embed, index as `kind`, save atomically to `output`.

    Raises:
        ConfigError: One line per bad source, option or parameter, a bad model path, or a missing faiss.
    """
    if faiss:
        require_faiss()
    given = parse_params(params)
    args = parse_data_args(data_args)
    problems = index_kinds.check_kind(kind, dtype, given, faiss=faiss)
    parsed = []
    for source in sources:
        try:
            parsed.append(parse_source(source, args))
        except ConfigError as e:
            problems += e.problems
    if args and not any(isinstance(p, DatasetSource) for p in parsed):
        problems.append("--data-arg: only used with a DATASET:SPLIT source (e.g. synthetic:test)")
    if Path(output).is_dir():
        problems.append(f"--output: {output!r} is a folder; give the index file to write")
    if problems:
        raise ConfigError(problems)
    embedder = load_embedder(model, device=device, threads=threads)
    index, skipped = index_images(
        parsed, embedder, model=resolve_spec(model), names=sources, batch_size=batch_size,
        dtype=dtype, thumb_size=thumb_size, backend="faiss" if faiss else "exact", kind=kind, params=given,
        progress=progress,
    )  # fmt: skip
    save_search_index(index, output)
    return index, skipped


def open_search(
    index_path: str, *, model: str | None = None, faiss: bool = False, device: str = "cpu", threads: int | None = 1,
    nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
) -> tuple[SearchIndex, Embedder]:
    """Load an index and the embedder of its queries (the recorded one unless `model` is given).

    `threads` sets an export's runtime threads and FAISS's (None: their defaults); for a
    checkpoint, wrap the queries in `torch_threads`. `nprobe`, `ef_search` and `rerank`
    override the approximate index's recorded query parameters.

    Raises:
        ConfigError: A missing or foreign index, a query parameter its kind does not take,
            a missing faiss, a missing model, or a model of another dimension.
    """
    index = SearchIndex.open(index_path, backend="faiss" if faiss else None, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
    if index.backend == "faiss" and threads:
        require_faiss().omp_set_num_threads(threads)  # process-wide: queries are one at a time anyway
    if model is None:
        try:
            embedder = load_embedder(index.model, device=device, what="INDEX", threads=threads)
        except ConfigError as e:
            raise ConfigError(f"{e.problems[0]}; the index {index_path!r} was built with it: pass --model to use another") from e
    else:
        embedder = load_embedder(model, device=device, threads=threads)
    if embedder.embed_dim != index.embed_dim:
        where = f"--model: {model!r}" if model else f"INDEX: the recorded model {index.model!r}"
        raise ConfigError(f"{where} embeds in {embedder.embed_dim} dimensions but the index {index_path!r} holds {index.embed_dim}")
    return index, embedder


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch intra-op threads (None or 0: unchanged), restored afterwards.

    Queries use one thread by default: one short query is too small to split, and handing
    it to a second thread costs more than it saves (on a busy 2-core machine, 100x more
    for a small text encoder: 170 ms instead of 2 ms).
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Results:
    """The answer to one query, with its latency split into encode and search."""

    query: str
    scores: np.ndarray
    indices: np.ndarray
    encode_ms: float
    search_ms: float

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.search_ms

    def rows(self, index: SearchIndex) -> list[dict[str, Any]]:
        """One dict per result: rank, index, id, score, caption."""
        return [
            {"rank": r + 1, "index": int(i), "id": index.ids[i], "score": round(float(s), 4), "caption": index.captions[i]}
            for r, (s, i) in enumerate(zip(self.scores.tolist(), self.indices.tolist()))
        ]


def query(index: SearchIndex, embedder: Embedder, text: str, k: int = 10) -> Results:
    """Encode `text` (tokenize + text encoder) and search the top k, timing both."""
    start = time.perf_counter()
    vector = embedder.encode_texts([text])[0]
    encoded = time.perf_counter()
    scores, indices = index.search(vector, k)
    done = time.perf_counter()
    return Results(text, scores, indices, (encoded - start) * 1e3, (done - encoded) * 1e3)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text  # keep the end of a path: the file name


def contact_sheet(index: SearchIndex, results: Results, path: str | Path, *, cell: int = 160, cols: int = 5) -> Path:
    """A PNG grid of the top images with rank, score and id under each, the query on top."""
    n = len(results.indices)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    pad, label, title = 8, 34, 30
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, title + rows * (cell + label + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    small, big = _font(12), _font(15)
    head = f'"{results.query}"  top {n} of {len(index)}  ({results.encode_ms:.1f} ms encode, {results.search_ms:.1f} ms search)'
    draw.text((pad, 8), _fit(draw, head, big, sheet.width - 2 * pad), fill="black", font=big)
    for r, (score, i) in enumerate(zip(results.scores.tolist(), results.indices.tolist())):
        x = pad + (r % cols) * (cell + pad)
        y = title + (r // cols) * (cell + label + pad)
        image = index.image(i)
        if image is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            draw.text((x + 6, y + cell // 2), "image not found", fill="black", font=small)
        else:
            image = image.copy()
            image.thumbnail((cell, cell), Image.Resampling.BICUBIC)
            if image.width < cell // 2:  # tiny thumbnails: scale up so they can be seen
                factor = cell // max(image.width, image.height)
                image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        draw.text((x, y + cell + 2), f"#{r + 1}  {score:.3f}", fill="black", font=small)
        draw.text((x, y + cell + 17), _fit(draw, index.ids[i], small, cell), fill=(60, 60, 60), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def format_results(index: SearchIndex, results: Results) -> str:
    """The table `distill search` prints: rank, score, id (and caption when stored), then latency."""
    lines = [f"{'rank':>4}  {'score':>7}  id"]
    for row in results.rows(index):
        caption = f"  ({row['caption']})" if row["caption"] else ""
        lines.append(f"{row['rank']:>4}  {row['score']:7.4f}  {row['id']}{caption}")
    lines.append(
        f"latency: {results.encode_ms:.2f} ms tokenize+encode, {results.search_ms:.2f} ms search "
        f"({index.describe()}, {len(index)} items), {results.total_ms:.2f} ms total"
    )
    return "\n".join(lines)
