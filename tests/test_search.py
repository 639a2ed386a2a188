"""`distill index build`, `distill search` and the search index: sources, results, errors."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.commands.cli import main
from distill.deploy.embedders import CheckpointEmbedder, Embedder
from distill.deploy.search import contact_sheet, query
from distill.deploy.search_index import (
    SearchIndex,
    index_images,
    load_search_index,
    save_search_index,
)
from distill.deploy.sources import parse_source, read_image
from distill.errors import ConfigError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}  # fmt: skip


class ColourEmbedder:
    """An embedder whose right answers are known: an image is its mean RGB, a text the sum of
    the colours it names, so "yellow" is nearest the yellow image (cosine 1)."""

    embed_dim = 3

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        rows = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)) + 1e-3 for im in images])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = np.stack([sum((np.array(c, np.float32) for w, c in COLOURS.items() if w in t), np.full(3, 1e-3, np.float32))
                         for t in texts])  # fmt: skip
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def describe(self) -> str:
        return "colour stub"


def square(colour: tuple[int, int, int], size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    image.putpixel((0, 0), (128, 128, 128))  # not quite uniform
    return image


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six colour squares in two subfolders (png and jpg), a broken jpg and a text file."""
    root = tmp_path / "photos"
    for i, (name, colour) in enumerate(COLOURS.items()):
        sub = root / ("warm" if name in ("red", "yellow", "magenta") else "cool")
        sub.mkdir(parents=True, exist_ok=True)
        square(colour).save(sub / f"{name}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def shards(tmp_path: Path) -> str:
    """Two webdataset shards: the six colours with captions, one corrupt image, one without image."""
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    names = list(COLOURS)
    for shard, part in enumerate((names[:3], names[3:])):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for name in part:
                meta = {"captions": [f"a {name} square", "a square"]}
                tar.write({"__key__": f"k_{name}", "jpg": jpeg(square(COLOURS[name])), "json": json.dumps(meta).encode()})
            if shard == 1:
                tar.write({"__key__": "k_bad", "jpg": b"garbage", "txt": b"broken"})
                tar.write({"__key__": "k_noimage", "txt": b"caption without image"})
    return str(folder / "{00000..00001}.tar")


def stub_index(sources: list[str], **kwargs) -> tuple[dict, object]:
    return index_images([parse_source(s) for s in sources], ColourEmbedder(), model="stub", names=sources,
                       progress=False, **kwargs)  # fmt: skip


def test_the_protocol_fits_the_stub() -> None:
    assert isinstance(ColourEmbedder(), Embedder)


def test_folder_index_finds_the_named_colour(image_folder: Path, tmp_path: Path) -> None:
    data, skipped = stub_index([str(image_folder)])
    assert data["ids"] == sorted(f"{'warm' if n in ('red', 'yellow', 'magenta') else 'cool'}/{n}.{'png' if i % 2 else 'jpg'}"
                                 for i, n in enumerate(COLOURS))  # fmt: skip
    assert dict(skipped.counts) == {"unreadable image": 1} and "broken.jpg" in skipped.summary()
    path = save_search_index(data, tmp_path / "out" / "colours.idx")
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file
    index = SearchIndex.open(path)
    assert index.embed_dim == 3 and len(index) == 6 and index.embedder == "colour stub"
    assert np.allclose(np.linalg.norm(index.matrix.numpy(), axis=1), 1, atol=1e-6)
    for name in COLOURS:
        results = query(index, ColourEmbedder(), f"something {name}", k=3)
        assert index.ids[results.indices[0]].endswith(f"/{name}.{'png' if list(COLOURS).index(name) % 2 else 'jpg'}")
        assert results.scores[0] == pytest.approx(1.0, abs=1e-3) and list(results.scores) == sorted(results.scores, reverse=True)
        assert results.encode_ms > 0 and results.search_ms > 0
    # an exact self-query returns the item itself first, in one batched call too
    scores, top = index.search(index.matrix, k=1)
    assert top[:, 0].tolist() == list(range(6)) and np.allclose(scores[:, 0], 1, atol=1e-5)
    # images come back from the thumbnails, and from the files when there are none
    assert index.image(0).size == (40, 40) and index.thumbnail(0) is not None
    bare = SearchIndex(stub_index([str(image_folder)], thumb_size=0)[0])
    assert bare.thumbnail(0) is None and bare.image(0).size == (40, 40) and bare.image_jpeg(0)[:2] == b"\xff\xd8"


def test_float16_index_keeps_the_answers(image_folder: Path) -> None:
    data, _ = stub_index([str(image_folder)], dtype="float16")
    assert str(data["embeddings"].dtype) == "torch.float16"
    index = SearchIndex(data)
    assert index.search(index.matrix, k=1)[1][:, 0].tolist() == list(range(6))
    assert index.ids[query(index, ColourEmbedder(), "cyan", 1).indices[0]] == "cool/cyan.jpg"


def test_shards_index_with_captions_and_read_back(shards: str) -> None:
    data, skipped = stub_index([shards], thumb_size=0)
    assert data["ids"] == [f"k_{n}" for n in COLOURS]
    assert data["captions"][0] == "a red square"
    assert dict(skipped.counts) == {"unreadable image": 1, "sample without image": 1}
    assert all(loc.endswith(f"#{i}.jpg") for loc, i in zip(data["locations"], data["ids"]))
    image = read_image(data["locations"][2])  # blue, read back from its shard
    assert image is not None and image.getpixel((20, 20))[2] > 200
    index = SearchIndex(data)
    assert index.ids[query(index, ColourEmbedder(), "magenta", 2).indices[0]] == "k_magenta"


def test_faiss_gives_the_exact_answer(image_folder: Path) -> None:
    pytest.importorskip("faiss")
    data, _ = stub_index([str(image_folder)], backend="faiss")
    exact, fast = SearchIndex(data, backend="exact"), SearchIndex(data)
    assert fast.backend == "faiss"
    q = ColourEmbedder().encode_texts(["red and blue"])[0]
    (s1, i1), (s2, i2) = exact.search(q, 4), fast.search(q, 4)
    assert i1.tolist() == i2.tolist() and np.allclose(s1, s2, atol=1e-5)


def test_faiss_missing_is_one_clear_line(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    data, _ = stub_index([str(image_folder)])
    with pytest.raises(ConfigError, match=r"^--faiss: the faiss package is not installed \(pip install faiss-cpu\)"):
        SearchIndex(data, backend="faiss")


def test_contact_sheet(image_folder: Path, tmp_path: Path) -> None:
    index = SearchIndex(stub_index([str(image_folder)])[0])
    results = query(index, ColourEmbedder(), "green", 4)
    sheet = Image.open(contact_sheet(index, results, tmp_path / "sheet.png"))
    assert sheet.size[0] > 4 * 160 and sheet.size[1] > 160
    # the first cell shows the best match, green
    assert sheet.getpixel((8 + 80, 30 + 80)) == pytest.approx((0, 255, 0), abs=40)


# --- the commands, end to end through a tiny real checkpoint -------------------------------


def test_build_and_search_through_a_checkpoint(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, sheet = tmp_path / "photos.idx", tmp_path / "top.png"
    assert main(["index", "build", str(image_folder), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--batch-size", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote {out}: 6 images x 16 (float32)" in printed and "skipped 1 unreadable image" in printed
    data = load_search_index(out)
    assert data["model"] == str(tiny_checkpoint.resolve()) and data["embed_dim"] == 16
    assert main(["search", str(out), "a red circle", "-k", "3", "--sheet", str(sheet)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "id"] and lines[-1] == f"wrote {sheet}"
    assert lines[-2].startswith("latency: ") and "ms tokenize+encode" in lines[-2] and "ms search (exact, 6 items)" in lines[-2]
    ranks = [line.split() for line in lines[1:4]]
    assert [r[0] for r in ranks] == ["1", "2", "3"]
    # the printed ranking is the brute-force one of the same embedder
    embedder = CheckpointEmbedder(tiny_checkpoint)
    scores = data["embeddings"].numpy() @ embedder.encode_texts(["a red circle"])[0]
    assert [r[2] for r in ranks] == [data["ids"][i] for i in np.argsort(-scores)[:3]]
    assert [float(r[1]) for r in ranks] == pytest.approx(np.sort(scores)[::-1][:3], abs=1e-3)
    assert Image.open(sheet).size[0] > 3 * 160
    # an exact self-query: each image, embedded again from its file, finds itself first
    index = SearchIndex(data)
    files = [image_folder / i for i in data["ids"]]
    vectors = embedder.encode_images([Image.open(f) for f in files])
    assert index.search(vectors, 1)[1][:, 0].tolist() == list(range(6))


def test_build_from_the_embedded_benchmark_split(tiny_checkpoint: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "test.idx"
    args = ["n_train=48", "n_val=12", "n_test=12", "image_size=32", f"root={data_root}"]
    assert main(["index", "build", "synthetic:test", "--model", f"{tiny_checkpoint}:student", "--output", str(out),
                 "--dtype", "float16", *[a for kv in args for a in ("--data-arg", kv)]]) == 0  # fmt: skip
    data = load_search_index(out)
    assert len(data["ids"]) == 12 and all(data["captions"]) and data["locations"] == [""] * 12
    index = SearchIndex(data)
    assert index.image(5) is not None and index.image(5).size == (32, 32)  # from the thumbnail
    embedder = CheckpointEmbedder(tiny_checkpoint, "student")
    results = query(index, embedder, data["captions"][3], 12)
    assert sorted(results.indices.tolist()) == list(range(12))


def test_search_with_another_model(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "photos.idx"
    assert main(["index", "build", str(image_folder), "--model", f"{tiny_checkpoint}:student", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "blue", "-k", "2", "--sheet", "", "--model", str(tiny_checkpoint)]) == 0
    assert "wrote" not in capsys.readouterr().out  # no sheet
    assert main(["search", str(out), "blue", "--sheet", "", "--model", f"{tiny_checkpoint}:teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model: '{tiny_checkpoint}:teacher' embeds in 24 dimensions but the index '{out}' holds 16"]


def test_through_an_export_folder(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    export = pytest.importorskip("distill.deploy.export")
    folder = export.export_checkpoint(tiny_checkpoint, format="onnx", output=tmp_path / "export")
    out = tmp_path / "photos.idx"
    assert main(["index", "build", str(image_folder), "--model", str(folder), "--output", str(out)]) == 0
    data = load_search_index(out)
    assert data["model"] == str(folder.resolve()) and data["embedder"].startswith("export ")
    # the exported student ranks like the checkpoint it came from
    torch_index = tmp_path / "torch.idx"
    assert main(["index", "build", str(image_folder), "--model", str(tiny_checkpoint), "--output", str(torch_index)]) == 0
    assert np.allclose(data["embeddings"].numpy(), load_search_index(torch_index)["embeddings"].numpy(), atol=1e-4)
    capsys.readouterr()
    assert main(["search", str(out), "a green square", "-k", "6", "--sheet", ""]) == 0
    assert "ms tokenize+encode" in capsys.readouterr().out


# --- bad inputs: exit code 2, one line naming the bad path -----------------------------------


def one_error(capsys: pytest.CaptureFixture[str], *parts: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in parts:
        assert part in err[0], err[0]


def test_bad_inputs(tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.idx")
    ckpt = str(tiny_checkpoint)
    assert main(["index", "build", "/no/such/folder", "--model", ckpt, "--output", out]) == 2
    one_error(capsys, "SOURCE", "'/no/such/folder' does not exist")
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "--model", ckpt, "--output", out]) == 2
    one_error(capsys, f"no jpg/jpeg/png/webp image under '{tmp_path / 'empty'}'")
    assert main(["index", "build", str(tmp_path / "s" / "{0..3}.tar"), "--model", ckpt, "--output", out]) == 2
    one_error(capsys, "SOURCE: no file matches", str(tmp_path / "s"))
    assert main(["index", "build", "synthetc:test", "--model", ckpt, "--output", out]) == 2
    one_error(capsys, "unknown dataset 'synthetc'; did you mean 'synthetic'?")
    assert main(["index", "build", str(image_folder), "--model", "/no/model.ckpt", "--output", out]) == 2
    one_error(capsys, "--model: checkpoint '/no/model.ckpt' does not exist")
    assert main(["index", "build", str(image_folder), "--model", str(image_folder), "--output", out]) == 2
    one_error(capsys, f"--model: '{image_folder}' is a folder without manifest.json")
    assert main(["search", "/no/such.idx", "red"]) == 2
    one_error(capsys, "INDEX: '/no/such.idx' does not exist; build it with `distill index build`")
    assert main(["serve", "/no/such.idx"]) == 2
    one_error(capsys, "INDEX: '/no/such.idx' does not exist")
    junk = tmp_path / "junk.idx"
    junk.write_text("hello")
    assert main(["search", str(junk), "red"]) == 2
    one_error(capsys, f"INDEX: '{junk}' is not a distill search index")
    assert not Path(out).exists()


def test_index_recorded_model_gone(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = stub_index([str(image_folder)])
    data["model"] = str(tmp_path / "gone.ckpt")
    path = save_search_index(data, tmp_path / "i.idx")
    assert main(["search", str(path), "red", "--sheet", ""]) == 2
    one_error(capsys, f"INDEX: checkpoint '{tmp_path / 'gone.ckpt'}' does not exist", "pass --model to use another")


def test_index_is_a_group(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # the old form: `index` needs `mine` or `build` now
        main(["index", str(tiny_yaml), "--model", "student", "--output", str(tmp_path / "hn.pt")])
    assert exc.value.code == 2
    capsys.readouterr()
    # a hard-negative index is refused by search, and a search index by the loss
    assert main(["index", "mine", str(tiny_yaml), "--model", "student", "--output", str(tmp_path / "hn.pt"), "--k", "2"]) == 0
    assert main(["search", str(tmp_path / "hn.pt"), "red"]) == 2
    one_error(capsys, "holds mined negatives (`distill index mine`), not a search index")


def test_search_index_is_refused_as_hard_negatives(image_folder: Path, tmp_path: Path) -> None:
    from distill.negatives.store import load_negatives

    path = save_search_index(stub_index([str(image_folder)])[0], tmp_path / "s.idx")
    with pytest.raises(ConfigError, match="a search index"):
        load_negatives(path)
