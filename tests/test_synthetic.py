"""The embedded synthetic benchmark: determinism, layout on disk, captions and tokenizer."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from distill.data.captions import SHAPE_WORDS, make_captions, vocabulary, words
from distill.data.scenes import COLOURS, sample_scene, vary_scene
from distill.data.synthetic import (
    TOKENIZER_DIR,
    SyntheticShapes,
    default_root,
    make_example,
    write_tokenizer,
)
from distill.registry import DATASETS

SIZES = {"n_train": 40, "n_val": 10, "n_test": 10}
SHAPE_NAMES = {
    w for pairs in SHAPE_WORDS.values() for pair in pairs for w in " ".join(pair).split()
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = SyntheticShapes(seed=0, root=str(tmp_path_factory.mktemp("synth") / "data"), **SIZES)
    ds.prepare()
    return ds.root


def test_registered() -> None:
    assert DATASETS.get("synthetic") is SyntheticShapes


def test_same_seed_same_bytes_other_seed_differs(root: Path, tmp_path: Path) -> None:
    again = SyntheticShapes(seed=0, root=str(tmp_path / "again"), **SIZES)
    again.prepare()
    for key in ("000000000", "000000007", "000000045"):
        assert (root / "images" / f"{key}.jpg").read_bytes() == (
            again.root / "images" / f"{key}.jpg"
        ).read_bytes()
    assert (root / "train" / "00000.tar").read_bytes() == (
        again.root / "train" / "00000.tar"
    ).read_bytes()
    assert (root / "dataset_synthetic.json").read_bytes() == (
        again.root / "dataset_synthetic.json"
    ).read_bytes()
    for index in range(3):
        a = make_example(seed=0, split="train", index=index, image_size=64)
        b = make_example(seed=1, split="train", index=index, image_size=64)
        assert a != b and a == make_example(seed=0, split="train", index=index, image_size=64)


def test_splits_captions_and_karpathy_json(root: Path) -> None:
    data = json.loads((root / "dataset_synthetic.json").read_text())
    assert data["dataset"] == "synthetic"
    by_split = {
        s: [im for im in data["images"] if im["split"] == s] for s in ("train", "val", "test")
    }
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [40, 10, 10]
    assert sorted(im["imgid"] for im in data["images"]) == list(range(60))
    for im in data["images"]:
        assert (root / im["filepath"] / im["filename"]).is_file()
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert all(
            s["tokens"] == words(s["raw"]) and s["imgid"] == im["imgid"] for s in im["sentences"]
        )
        said = {w for r in raws for w in words(r)}
        assert said & set(COLOURS) and said & SHAPE_NAMES


def test_shards_in_img2dataset_layout(root: Path) -> None:
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        with tarfile.open(root / split / "00000.tar") as tar:
            names = tar.getnames()
            assert len(names) == 3 * n
            key = names[0].split(".")[0]
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(names)
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            assert (
                meta["key"] == key and meta["image_id"] == int(key) and len(meta["captions"]) == 5
            )
            assert (
                tar.extractfile(f"{key}.txt").read().decode()
                == meta["caption"]
                == meta["captions"][0]
            )
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
            assert image.size == (64, 64)
    assert (root / "_DONE").is_file()


def test_reused_when_done(root: Path) -> None:
    before = (root / "_DONE").stat().st_mtime_ns
    SyntheticShapes(seed=0, root=str(root), **SIZES).prepare()
    assert (root / "_DONE").stat().st_mtime_ns == before
    assert default_root(seed=0, sizes=(40, 10, 10), image_size=64) != default_root(
        seed=0, sizes=(40, 10, 11), image_size=64
    )


def test_scenes_are_compositional() -> None:
    for i in range(300):
        rng = random.Random(i)
        base = sample_scene(rng)
        assert 2 <= len(base.groups) <= 4 and sum(g.count for g in base.groups) >= 2
        variant = vary_scene(base, rng)
        assert sorted(map(repr, variant.groups)) != sorted(map(repr, base.groups))
        assert len(set(make_captions(variant, rng))) == 5


def test_readers_serve_the_files(root: Path) -> None:
    for fmt in ("webdataset", "karpathy"):
        ds = SyntheticShapes(seed=0, root=str(root), format=fmt, **SIZES)
        assert ds.check() == []
        val = list(ds.eval_images("val"))
        assert sorted(i for i, _, _ in val) == list(range(40, 50))
        assert all(len(caps) == 5 and im.size == (64, 64) for _, im, caps in val)
        assert len(list(ds.train_samples(captions_per_image="all"))) == 200


def test_tokenizer_loads_and_covers_the_grammar(root: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tok.pad_token_id == 0 and tok.is_fast
    captions = [
        s["raw"]
        for im in json.loads((root / "dataset_synthetic.json").read_text())["images"]
        for s in im["sentences"]
    ]
    ids = tok(captions)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert set(vocabulary()) <= set(tok.get_vocab())
    fresh = write_tokenizer(tmp_path / "tok")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (fresh / name).read_text() == (TOKENIZER_DIR / name).read_text(), (
            f"rerun: python -m distill.data.synthetic --write-tokenizer ({name})"
        )


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match="data.args.format"):
        SyntheticShapes(format="csv", root=str(tmp_path))
