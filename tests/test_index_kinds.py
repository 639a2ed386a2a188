"""Index kinds: exact float32 / float16 / int8 and FAISS's IVF-flat, IVF-PQ and HNSW.

Each kind builds, saves, loads and answers; compact scores stay within their stated bounds
of float32's; a missing faiss is one line naming the extra; `search` and `serve` answer on
every kind; bad options are one line naming the option.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.commands.cli import main
from distill.deploy import index_kinds
from distill.deploy.index_ann import HNSW_EF_CONSTRUCTION
from distill.deploy.index_exact import ExactSearch, FaissExact, dequantize, encode
from distill.deploy.search_index import (
    SearchIndex,
    load_search_index,
    rebuild_index,
    save_search_index,
)
from distill.errors import ConfigError
from tests.test_search import ColourEmbedder, image_folder, one_error, stub_index  # noqa: F401 (fixture)
from tests.test_serve import get, running

faiss = pytest.importorskip("faiss")
N, D = 3000, 32
ANN = ("ivf_flat", "ivf_pq", "hnsw")
VARIANTS = [("exact", "float32"), ("exact", "float16"), ("exact", "int8"), *[(k, "float32") for k in ANN]]
EXACT = [(dtype, backend) for dtype in ("float32", "float16", "int8") for backend in ("exact", "faiss")]
FP16_BOUND = 2.0**-11  # |x - fp16(x)| <= 2^-11 |x|, so |q.x - q.fp16(x)| <= 2^-11 sum |q||x| <= 2^-11 for unit q, x


def clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Unit rows around 30 centres: neighbours exist, as in real embeddings."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, dim, generator=gen)
    rows = centres[torch.randint(0, 30, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(rows, dim=1)


def base_index(rows: torch.Tensor) -> dict:
    """The non-search fields of an index over `rows` (as `index_images` would record them)."""
    n = len(rows)
    return {"version": 2, "kind": "distill-search-index", "model": "stub", "embedder": "stub", "embed_dim": rows.shape[1],
            "backend": "exact", "sources": ["rows"], "ids": [f"r{i}" for i in range(n)], "locations": [""] * n,
            "captions": [""] * n, "thumbs": torch.zeros(0, dtype=torch.uint8),
            "thumb_offsets": torch.zeros(n + 1, dtype=torch.int64), "skipped": {}}  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    return clustered(N, D)


@pytest.fixture(scope="module")
def queries(rows: torch.Tensor) -> torch.Tensor:
    """40 unit vectors near stored rows (none of them stored)."""
    noise = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.normalize(rows[::75][:40] + 0.5 * noise / D**0.5, dim=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist())]))


@pytest.mark.parametrize(("kind", "dtype", "backend"), [*[(k, d, "exact") for k, d in VARIANTS],
                                                        ("exact", "float16", "faiss"), ("exact", "int8", "faiss")])  # fmt: skip
def test_every_kind_builds_saves_loads_and_answers(kind: str, dtype: str, backend: str, rows: torch.Tensor,
                                                   queries: torch.Tensor, tmp_path: Path) -> None:  # fmt: skip
    data = rebuild_index(base_index(rows), rows, kind=kind, dtype=dtype, backend=backend)
    path = save_search_index(data, tmp_path / f"{kind}.idx")
    loaded = load_search_index(path)
    assert loaded["search"]["kind"] == kind and loaded["search"]["dtype"] == dtype
    assert str(loaded["embeddings"].dtype) == f"torch.{dtype}" and loaded["backend"] == (backend if kind == "exact" else "faiss")
    if kind != "exact":  # the parameters chosen from the size are recorded, and the FAISS index
        assert set(loaded["search"]["params"]) >= {"nlist", "nprobe"} or kind == "hnsw"
        assert loaded["faiss"].numel() > 0 and loaded["search"]["build_s"] > 0
    index = SearchIndex.open(path)
    truth = (queries @ rows.t()).topk(10, dim=1).indices.numpy()
    scores, found = index.search(queries, 10)
    assert found.shape == (40, 10) and (np.diff(scores, axis=1) <= 1e-6).all()
    assert recall(found, truth) >= {"exact": 0.97, "ivf_flat": 0.95, "ivf_pq": 0.9, "hnsw": 0.95}[kind]
    one_scores, one = index.search(queries[0], 10)  # a single query answers as the batch does
    assert one.tolist() == found[0].tolist() and np.allclose(one_scores, scores[0], atol=1e-5)
    assert index.search(rows[7], 1)[1].tolist() == [7]  # a stored row finds itself
    assert index.nbytes > 0 and index.describe().startswith(backend if kind == "exact" else kind)


@pytest.mark.parametrize(("dtype", "backend"), EXACT)
def test_compact_scores_agree_with_float32_within_the_bound(dtype: str, backend: str, rows: torch.Tensor,
                                                             queries: torch.Tensor) -> None:  # fmt: skip
    stored, quant = encode(rows, dtype)
    engine = ExactSearch(stored, quant) if backend == "exact" else FaissExact(faiss, stored, quant)
    exact = (queries @ rows.t()).numpy()
    dequantised = (queries @ dequantize(stored, quant).t()).numpy()
    for q, row, own in zip(queries, exact, dequantised):
        # float16: 11 significant bits; int8: each value within scale / 2, so a score within sum |q| scale / 2
        bound = {"float32": 1e-6, "float16": FP16_BOUND, "int8": float(q.abs() @ quant[0]) / 2 if quant.numel() else 0}[dtype]
        scores, found = engine.search(q, 50)
        assert np.abs(scores - row[found]).max() <= bound + 1e-6
        assert np.allclose(scores, own[found], atol=1e-5)  # the stored rows' own scores,
        assert np.allclose(scores, np.sort(own)[::-1][:50], atol=1e-5)  # and their true top 50
    assert FP16_BOUND < 5e-4  # the bound the documentation states


def test_query_parameters_change_the_answer_and_are_checked(rows: torch.Tensor, queries: torch.Tensor) -> None:
    ivf = SearchIndex(rebuild_index(base_index(rows), rows, kind="ivf_flat", params={"nlist": 32}))
    truth = (queries @ rows.t()).topk(10, dim=1).indices.numpy()
    ivf.set_query(nprobe=1)
    narrow = recall(ivf.search(queries, 10)[1], truth)
    ivf.set_query(nprobe=32)  # every list: exact
    assert recall(ivf.search(queries, 10)[1], truth) == 1.0 > narrow
    assert ivf.describe() == "ivf_flat nlist=32 nprobe=32"
    with pytest.raises(ConfigError, match=r"^--nprobe: 33 is more than the index's 32 lists$"):
        ivf.set_query(nprobe=33)
    with pytest.raises(ConfigError, match=r"^--ef-search: does not apply to an ivf_flat index \(it takes --nprobe\)$"):
        ivf.set_query(ef_search=10)
    hnsw = SearchIndex(rebuild_index(base_index(rows), rows, kind="hnsw", params={"M": 8}), ef_search=200)
    assert hnsw.describe() == f"hnsw M=8 ef_construction={HNSW_EF_CONSTRUCTION} ef_search=200"
    assert recall(hnsw.search(queries, 10)[1], truth) >= 0.99
    pq = SearchIndex(rebuild_index(base_index(rows), rows, kind="ivf_pq"), rerank=0, nprobe=64)
    plain = recall(pq.search(queries, 10)[1], truth)
    pq.set_query(rerank=200)
    assert recall(pq.search(queries, 10)[1], truth) > plain
    exact = SearchIndex(rebuild_index(base_index(rows), rows, kind="exact"))
    with pytest.raises(ConfigError, match=r"^ef_search: an exact index takes no query parameters$"):
        exact.set_query(ef_search=4)


def test_bad_build_parameters_are_one_line_each(rows: torch.Tensor) -> None:
    base = base_index(rows)
    cases = [
        ({"kind": "hnsw", "params": {"ef_serch": 10}}, r"^--param ef_serch: not a parameter of an hnsw index .*did you mean 'ef_search'\?$"),
        ({"kind": "ivf_flat", "params": {"nlist": 0}}, r"^--param nlist: must be an integer >= 1, got 0$"),
        ({"kind": "ivf_flat", "params": {"nlist": N + 1}}, rf"^--param nlist: {N + 1} lists for {N} rows"),
        ({"kind": "ivf_pq", "params": {"m": 5}}, rf"^--param m: 5 does not divide the embedding width {D}$"),
        ({"kind": "exact", "params": {"M": 4}}, r"^--param: only with --kind ivf_flat/ivf_pq/hnsw"),
        ({"kind": "auto", "params": {"M": 4}}, r"^--param: only with --kind"),
        ({"kind": "annoy"}, r"^--kind: must be auto or one of exact, ivf_flat, ivf_pq, hnsw, got 'annoy'$"),
        ({"kind": "exact", "dtype": "int4"}, r"^--dtype: must be one of float32, float16, int8, got 'int4'$"),
        ({"kind": "hnsw", "backend": "faiss"}, r"^--faiss: an hnsw index is searched by FAISS anyway"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message) as exc:
            rebuild_index(base, rows, **options)
        assert len(exc.value.problems) == 1, exc.value.problems


def test_auto_picks_exact_when_small_and_ivf_flat_when_large(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = index_kinds.AUTO_EXACT_MAX
    assert index_kinds.choose_kind("auto", limit, 128)[0] == "exact"
    kind, why = index_kinds.choose_kind("auto", limit + 1, 128)
    assert kind == index_kinds.AUTO_ANN == "ivf_flat" and why.startswith(f"auto: {limit + 1:,} images > {limit:,}")
    assert index_kinds.choose_kind("auto", limit + 1, 512)[0] == "ivf_flat"  # the limit is in bytes: wider rows, fewer
    assert index_kinds.choose_kind("auto", limit // 2, 512)[0] == "ivf_flat"
    monkeypatch.setitem(sys.modules, "faiss", None)
    kind, why = index_kinds.choose_kind("auto", limit + 1, 128)
    assert kind == "exact" and "faiss is not installed (pip install 'distill[faiss]')" in why


def test_a_missing_faiss_is_one_line_naming_the_extra(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = save_search_index(stub_index([str(image_folder)], kind="hnsw")[0], tmp_path / "h.idx")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ConfigError, match=r"^--kind hnsw: needs the faiss package, which is not installed: "
                                          r"pip install 'distill\[faiss\]' \(or pip install faiss-cpu\)$"):  # fmt: skip
        stub_index([str(image_folder)], kind="hnsw")
    with pytest.raises(ConfigError, match=rf"^INDEX: '{path}' \(an hnsw index\): needs the faiss package, which is not installed: pip install 'distill\[faiss\]'"):
        SearchIndex.open(path)
    assert main(["search", str(path), "red", "--sheet", ""]) == 2
    one_error(capsys, f"INDEX: '{path}' (an hnsw index): needs the faiss package", "pip install 'distill[faiss]'")
    assert main(["serve", str(path), "--port", "0"]) == 2
    one_error(capsys, "(an hnsw index): needs the faiss package")
    exact = save_search_index(stub_index([str(image_folder)])[0], tmp_path / "e.idx")
    assert SearchIndex.open(exact).search(ColourEmbedder().encode_texts(["red"])[0], 1)[1].size == 1  # exact needs none


def test_an_old_index_file_loads_as_exact(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    data = stub_index([str(image_folder)], dtype="float16")[0]
    old = {k: v for k, v in data.items() if k not in ("quant", "search", "faiss")} | {"version": 1}
    path = tmp_path / "v1.idx"
    torch.save(old, path)
    index = SearchIndex.open(path)
    assert index.kind == "exact" and index.dtype == "float16" and index.describe() == "exact float16"
    assert index.ids[index.search(ColourEmbedder().encode_texts(["cyan"])[0], 1)[1][0]] == "cool/cyan.jpg"


# --- the commands over every kind ------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype", "knob"), [("exact", "int8", []), ("ivf_flat", "float32", ["--nprobe", "1"]),
                                                     ("ivf_pq", "float16", ["--nprobe", "1", "--rerank", "6"]),
                                                     ("hnsw", "float32", ["--ef-search", "16"])])  # fmt: skip
def test_build_and_search_every_kind(kind: str, dtype: str, knob: list[str], tiny_checkpoint: Path, image_folder: Path,  # noqa: F811
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / f"{kind}.idx"
    assert main(["index", "build", str(image_folder), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--kind", kind, "--dtype", dtype]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote {out}: 6 images x 16 ({dtype})" in printed and f"index kind: {kind} " in printed and "(--kind " in printed
    assert main(["search", str(out), "a red circle", "-k", "3", "--sheet", "", *knob]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert f"ms search ({kind}" in lines[-1] or f"ms search (exact {dtype}, 6 items)" in lines[-1]
    if knob:
        assert f"{knob[0].removeprefix('--').replace('-', '_')}={knob[1]}" in lines[-1]
        wrong = ["--ef-search", "4"] if kind != "hnsw" else ["--nprobe", "4"]
        assert main(["search", str(out), "red", "--sheet", "", *wrong]) == 2
        one_error(capsys, f"{wrong[0]}: does not apply to an {kind} index")
    else:
        assert main(["search", str(out), "red", "--sheet", "", "--nprobe", "2"]) == 2
        one_error(capsys, "--nprobe: INDEX: ", "is an exact index")


def test_build_options_are_checked_before_embedding(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    build = ["index", "build", str(image_folder), "--model", "/no/such.ckpt", "--output", str(tmp_path / "x.idx")]
    assert main([*build, "--kind", "hnsw", "--param", "M=abc"]) == 2
    one_error(capsys, "--param M: must be an integer, got 'abc'")
    assert main([*build, "--kind", "hnsw", "--param", "M"]) == 2
    one_error(capsys, "--param: expected KEY=VALUE, got 'M'")
    assert main([*build, "--kind", "ivf_flat", "--param", "nprob=4"]) == 2
    one_error(capsys, "--param nprob: not a parameter of an ivf_flat index", "did you mean 'nprobe'?")
    assert not (tmp_path / "x.idx").exists()


@pytest.mark.parametrize(("kind", "dtype"), VARIANTS)
def test_serve_answers_on_every_kind(kind: str, dtype: str, image_folder: Path) -> None:  # noqa: F811
    index = SearchIndex(stub_index([str(image_folder)], kind=kind, dtype=dtype)[0], ef_search=8 if kind == "hnsw" else None)
    with running(index) as (_, port):
        status, body = get(port, "/api/search?q=something+yellow&k=3")
        assert status == 200
        found = json.loads(body)
        assert found["results"][0]["id"] == "warm/yellow.png" and len(found["results"]) == 3
        status, body = get(port, "/api/info")
        assert status == 200 and json.loads(body)["search"] == index.describe()


def test_auto_says_what_it_chose(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "auto.idx"
    build = ["index", "build", str(image_folder), "--model", str(tiny_checkpoint), "--output", str(out)]
    assert main(build) == 0
    assert "index kind: exact float32 (auto: 6 images <= " in capsys.readouterr().out
    monkeypatch.setattr(index_kinds, "AUTO_EXACT_BYTES", 4 * 16 * 5)  # five rows of width 16
    assert main(build) == 0
    assert "index kind: ivf_flat nlist=1 train_size=6 nprobe=1, built in " in capsys.readouterr().out
    assert load_search_index(out)["search"]["choice"] == "auto: 6 images > 5, approximate search (--kind exact to keep exact)"


def test_texts_round_trip_through_the_file(rows: torch.Tensor, tmp_path: Path) -> None:
    data = base_index(rows[:4])
    data["ids"], data["captions"] = ["café/ü.png", "", "a\nb", "x" * 300], ["un été", "", "", "ok"]
    path = save_search_index(rebuild_index(data, rows[:4], kind="exact"), tmp_path / "t.idx")
    loaded = load_search_index(path)
    assert loaded["ids"] == data["ids"] and loaded["captions"] == data["captions"] and loaded["locations"] == [""] * 4
