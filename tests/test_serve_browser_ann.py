"""`distill serve` in a real headless browser over an approximate (HNSW) index.

The same page checks as tests/test_serve_browser.py (its tests and fixtures, imported), over
the same eight images indexed with `--kind hnsw`: the page, the JSON API and the images
answer as they do over an exact index, and `/api/info` names the kind.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from distill.commands.cli import main
from distill.deploy.index_ann import HNSW_EF_CONSTRUCTION
from tests.test_serve_browser import (  # noqa: F401 (fixtures and tests run again here, over this index_file)
    browser,
    pytestmark,
    server,
    test_json_api,
    test_query_in_a_real_browser,
)

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def index_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eight drawn images of tests/test_serve_browser.py, in an HNSW index."""
    folder = tmp_path_factory.mktemp("gallery")
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]):
        image = Image.new("RGB", (48, 48), "grey")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)([8, 8, 40, 40], fill=colour)
        image.save(folder / f"{i}_{colour}.png")
    out = folder / "gallery-hnsw.idx"
    assert main(["index", "build", str(folder), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--kind", "hnsw", "--param", "M=8"]) == 0  # fmt: skip
    return out


def test_info_names_the_kind(server: str) -> None:  # noqa: F811
    with urllib.request.urlopen(f"{server}api/info") as resp:
        info = json.load(resp)
    assert info["backend"] == "faiss" and info["search"] == f"hnsw M=8 ef_construction={HNSW_EF_CONSTRUCTION} ef_search=16"
