"""The `hf_datasets` reader: `save_to_disk` folders and local parquet files, Karpathy-style splits."""

from __future__ import annotations

import io
import random
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from distill.batch import Batch, RetrievalBatch
from distill.core.check import load_checked
from distill.data.base import Part
from distill.data.hf_datasets import INSTALL, HFDatasets
from distill.data.loading import eval_loader
from distill.data.synthetic import TOKENIZER_DIR
from distill.errors import ConfigError
from distill.eval.retrieval import retrieval_metrics
from distill.models.base import ImagePreprocess, TextPreprocess
from distill.registry import DATASETS
from distill.training.datamodule import DistillDataModule

hf = pytest.importorskip("datasets")
hf.disable_progress_bars()  # the fixtures' save_to_disk and to_parquet

SPLITS = ["train", "train", "restval", "train", "val", "val", "test", "test"]
"""Karpathy's split values of images 100..107 (restval is training data)."""
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def draw(i: int, size: int = 32) -> Image.Image:
    """Image `i`: a random background and two random rectangles (fixed by `i`)."""
    rng = random.Random(i)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    im = Image.new("RGB", (size, size), colour())
    pen = ImageDraw.Draw(im)
    for _ in range(2):
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        pen.rectangle((x, y, x + rng.randrange(4, size // 2), y + rng.randrange(4, size // 2)), fill=colour())
    return im


def captions(i: int) -> list[str]:
    return [f"a {COLOURS[i]} square {i} seen {view}" for view in ("above", "left", "close")]


def rows(indices: range | list[int]) -> dict[str, list]:
    return {
        "image": [draw(i) for i in indices],
        "caption": [captions(i) for i in indices],
        "split": [SPLITS[i] for i in indices],
        "img_id": [100 + i for i in indices],
    }


def table(indices: range | list[int]):  # noqa: ANN201
    return hf.Dataset.from_dict(rows(indices)).cast_column("image", hf.Image())


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A DatasetDict saved with `save_to_disk`: splits train, restval, validation, test."""
    by_split = {"train": [0, 1, 3], "restval": [2], "validation": [4, 5], "test": [6, 7]}
    folder = tmp_path / "saved"
    hf.DatasetDict({name: table(ix) for name, ix in by_split.items()}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def parquet(tmp_path: Path) -> str:
    """The same 8 rows as two parquet files, with a `split` column; returns their glob."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    table(range(4)).to_parquet(str(folder / "part-0.parquet"))
    table(range(4, 8)).to_parquet(str(folder / "part-1.parquet"))
    return str(folder / "*.parquet")


def by_id(ds: HFDatasets, split: str) -> dict[int, tuple[Image.Image, list[str]]]:
    return {i: (im, caps) for i, im, caps in ds.eval_images(split)}


def assert_karpathy_splits(ds: HFDatasets) -> None:
    assert ds.check() == []
    assert ds.train_size("all") == 12 and ds.train_size("random") == 4
    train = by_id(ds, "train")
    assert sorted(train) == [100, 101, 102, 103]  # restval is training data
    assert sorted(by_id(ds, "val")) == [104, 105] and sorted(by_id(ds, "test")) == [106, 107]
    for i, (im, caps) in {**train, **by_id(ds, "test")}.items():
        assert caps == captions(i - 100) and im.mode == "RGB"
        assert im.tobytes() == draw(i - 100).tobytes()  # decoded exactly (PNG in the dataset)
    samples = list(ds.train_samples(seed=1))
    assert len(samples) == 12 and Counter(s[1] for s in samples) == {100: 3, 101: 3, 102: 3, 103: 3}
    assert all(s[3] == captions(s[1] - 100)[int(s[0].rsplit("/", 1)[1])] for s in samples)


def test_registered() -> None:
    assert DATASETS.get("hf_datasets") is HFDatasets


def test_save_to_disk_dataset_dict(saved: Path) -> None:
    ds = HFDatasets(path=str(saved), id_column="img_id")
    assert_karpathy_splits(ds)
    assert set(ds.content_signature("train")) == {
        str(saved / s / "data-00000-of-00001.arrow") for s in ("train", "restval")
    }
    no_ids = HFDatasets(path=str(saved))  # ids from the keys `<split>/<row>`: stable and distinct
    keys = [(k, i) for k, i, _, _ in no_ids.images("test", part=Part(), seed=None, epoch=0, skipped=Counter())]
    assert [k for k, _ in keys] == ["test/0", "test/1"] and len({i for _, i in keys}) == 2
    assert [i for i, _, _ in HFDatasets(path=str(saved)).eval_images("test")] == [i for _, i in keys]


def test_parquet_with_split_column(parquet: str, tmp_path: Path) -> None:
    ds = HFDatasets(data_files=parquet, split_column="split", id_column="img_id", cache_dir=str(tmp_path / "cache"))
    assert_karpathy_splits(ds)
    assert sorted(ds.content_signature("val")) == sorted(str(p) for p in Path(parquet).parent.glob("*.parquet"))
    mapped = HFDatasets(data_files={"train": parquet}, split_column="split", id_column="img_id",
                        splits={"train": "train", "test": ["val", "test"]}, cache_dir=str(tmp_path / "cache"))
    assert mapped.check() == [] and mapped.train_size("random") == 3 and not mapped.has_split("val")
    assert sorted(by_id(mapped, "test")) == [104, 105, 106, 107]


def test_rows_per_caption_and_image_paths(tmp_path: Path) -> None:
    """One row per caption, images as paths under `image_root`: rows sharing an id are one image."""
    root = tmp_path / "images"
    root.mkdir()
    columns: dict[str, list] = {"file": [], "sentence": [], "split": [], "cocoid": []}
    for i in range(4):
        draw(i).save(root / f"{i}.png")
        for caption in captions(i):
            columns["file"].append(f"{i}.png")
            columns["sentence"].append(caption)
            columns["split"].append(["train", "train", "test", "test"][i])
            columns["cocoid"].append(f"coco-{i}")
    hf.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "rows"))
    args = dict(path=str(tmp_path / "rows"), image_column="file", caption_column="sentence",
                split_column="split", id_column="cocoid", image_root=str(root))
    ds = HFDatasets(**args)
    assert ds.check() == [] and ds.train_size("all") == 6 and ds.train_size("random") == 2
    test = list(ds.eval_images("test"))
    assert [caps for _, _, caps in test] == [captions(2), captions(3)] and test[0][1].tobytes() == draw(2).tobytes()
    assert len({i for i, _, _ in test}) == 2
    assert ds.content_signature("train")[str(root)].startswith("2 images ")  # signed as karpathy.py signs
    (root / "3.png").unlink()
    assert HFDatasets(**args).check() == [f"data.args.image_root: 1 images are missing: {root / '3.png'}"]
    skipped: Counter = Counter()
    assert len(list(HFDatasets(**args).eval_images("test", skipped=skipped))) == 1
    assert skipped == {"missing_image": 1}


def test_bytes_column_and_bad_images_are_skipped(tmp_path: Path) -> None:
    def png(i: int) -> bytes:
        buf = io.BytesIO()
        draw(i).save(buf, format="PNG")
        return buf.getvalue()

    data = {"jpg": [png(0), b"not an image", png(2)], "txt": ["a red square", "a green square", "  "]}
    hf.Dataset.from_dict(data).save_to_disk(str(tmp_path / "raw"))
    ds = HFDatasets(path=str(tmp_path / "raw"), image_column="jpg", caption_column="txt")
    skipped: Counter = Counter()
    samples = list(ds.train_samples(skipped=skipped))
    assert [s[3] for s in samples] == ["a red square"] and samples[0][2].tobytes() == draw(0).tobytes()
    assert skipped == {"undecodable_image": 1, "empty_caption": 1}


def test_parts_are_disjoint_and_cover_the_split(saved: Path) -> None:
    ds = HFDatasets(path=str(saved), id_column="img_id")
    seen = [[i for i, _, _ in ds.eval_images("train", part=Part(rank, 2))] for rank in range(2)]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == [100, 101, 102, 103]


def preprocess() -> dict:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return {"student": (ImagePreprocess(32), TextPreprocess(tokenizer, 16))}


def test_loaders_and_retrieval_count_every_caption_as_positive(saved: Path) -> None:
    cfg = SimpleNamespace(dataset="hf_datasets", args={"path": str(saved), "id_column": "img_id"}, batch_size=4,
                          eval_batch_size=3, num_workers=0, shuffle_buffer=8, captions_per_image="all", seed=0,
                          steps_per_epoch=None)
    dm = DistillDataModule(cfg, preprocess())
    dm.check()
    train = list(dm.train_dataloader())
    assert len(train) == 3 and all(isinstance(b, Batch) and len(b) == 4 for b in train)
    assert sorted(i for b in train for i in b.image_ids.tolist()) == sorted([100, 101, 102, 103] * 3)
    [val] = list(dm.val_dataloader())
    assert isinstance(val, RetrievalBatch) and val.image_ids.tolist() == [104, 105]
    assert val.text_image_ids.tolist() == [104] * 3 + [105] * 3
    assert val.image_inputs["student"]["pixel_values"].shape == (2, 3, 32, 32)
    batches = list(eval_loader(dm.dataset, preprocess(), "test", batch_size=1, num_workers=0))
    image_ids = torch.cat([b.image_ids for b in batches])
    text_ids = torch.cat([b.text_image_ids for b in batches])
    assert image_ids.tolist() == [106, 107] and text_ids.tolist() == [106] * 3 + [107] * 3
    # embeddings that know only the image id: every caption of an image must count as its positive
    onehot = lambda ids: torch.nn.functional.one_hot(ids - 100, 8).float()  # noqa: E731
    metrics = retrieval_metrics(onehot(image_ids), image_ids, onehot(text_ids), text_ids)
    assert metrics["rsum"] == pytest.approx(600.0)


# ---- errors: one line each, naming the YAML key or the file ---------------------------------


def test_missing_path_and_files(tmp_path: Path) -> None:
    assert HFDatasets(path=str(tmp_path / "nope")).check() == [f"data.args.path: folder not found: {tmp_path / 'nope'}"]
    (tmp_path / "plain").mkdir()
    [line] = HFDatasets(path=str(tmp_path / "plain")).check()
    assert line.startswith(f"data.args.path: {tmp_path / 'plain'} is not a dataset folder written by save_to_disk")
    assert HFDatasets(data_files=str(tmp_path / "*.parquet")).check() == [
        f"data.args.data_files: no file matches {tmp_path / '*.parquet'}"]
    assert HFDatasets(data_files={"test": "hf://datasets/x/y.parquet"}).check() == [
        "data.args.data_files.test: 'hf://datasets/x/y.parquet' is not a local file; hf_datasets reads local "
        "parquet files only (download them first)"]
    assert HFDatasets().check()[0].startswith("data.args: give either path")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    [line] = HFDatasets(data_files=str(tmp_path / "bad.parquet"), cache_dir=str(tmp_path / "cache")).check()
    assert line.startswith(f"data.args.data_files: cannot read {tmp_path / 'bad.parquet'} as parquet (")


def test_missing_and_mistyped_columns(saved: Path) -> None:
    [line] = HFDatasets(path=str(saved), caption_column="captions").check()
    assert line == (f"data.args.caption_column: no column 'captions' in {saved / 'train'}; "
                    "columns: image, caption, split, img_id")
    [line] = HFDatasets(path=str(saved), split_column="subset").check()
    assert line.startswith("data.args.split_column: no column 'subset'")
    assert HFDatasets(path=str(saved), caption_column="img_id").check() == [
        f"data.args.caption_column: column 'img_id' of {saved / 'train'} holds int64, "
        "not a caption string or a list of strings per row"]
    assert HFDatasets(path=str(saved), image_column="img_id").check() == [
        f"data.args.image_column: column 'img_id' of {saved / 'train'} holds int64, "
        "not images (an Image feature, bytes or paths)"]


def test_caption_lists_of_non_strings(tmp_path: Path) -> None:
    hf.Dataset.from_dict({"image": ["a.png"], "caption": [[1, 2]]}).save_to_disk(str(tmp_path / "ints"))
    assert HFDatasets(path=str(tmp_path / "ints")).check() == [
        f"data.args.caption_column: column 'caption' of {tmp_path / 'ints'} holds lists of int64, "
        "not a caption string or a list of strings per row"]


def test_empty_and_unknown_splits(saved: Path, parquet: str, tmp_path: Path) -> None:
    [line] = HFDatasets(path=str(saved), splits={"val": "dev"}).check()
    assert line == f"data.args.splits.val: no split 'dev' in {saved}; found: train, restval, validation, test"
    [line] = HFDatasets(data_files=parquet, split_column="split", splits={"train": "training"},
                        cache_dir=str(tmp_path / "cache")).check()
    assert line.startswith("data.args.splits.train: no column 'split' value 'training' in ")
    assert line.endswith("found: restval, test, train, val")
    assert HFDatasets(path=str(saved), splits={"dev": "val"}).check() == [
        "data.args.splits.dev: unknown split 'dev'; ours are train, val, test"]
    assert HFDatasets(path=str(saved), splits={"train": "train", "val": "train"}).check() == [
        "data.args.splits.val: 'train' is already read by data.args.splits.train"]
    only_test = tmp_path / "only_test"
    hf.DatasetDict({"test": table([6])}).save_to_disk(str(only_test))
    [line] = HFDatasets(path=str(only_test)).check()
    assert line.startswith(f"data.args.splits.train: the train split is empty: {only_test} has no rows of train, restval")
    assert HFDatasets(path=str(only_test), splits={"train": "test"}).check() == []


def test_missing_datasets_package_names_the_extra(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    [line] = HFDatasets(path=str(saved)).check()
    assert line.startswith("data.dataset: 'hf_datasets' needs the Python package datasets") and line.endswith(INSTALL)
    assert INSTALL == "pip install 'distill[datasets]'"


# ---- end to end -----------------------------------------------------------------------------


def overrides(saved: Path, tmp_path: Path, **args: str) -> list[str]:
    """The tiny config (`tiny_yaml`) on `saved`: 12 training pairs, 3 steps of 4."""
    items = ", ".join(f"{k}: '{v}'" for k, v in {"path": str(saved), "id_column": "img_id", **args}.items())
    return ["data.dataset=hf_datasets",
            "data.args=null",  # a mapping override merges: drop the synthetic set's args first
            f"data.args={{{items}}}", "data.batch_size=4", "data.eval_batch_size=4", "trainer.max_steps=3",
            "trainer.checkpoint_every_n_steps=3", f"output_dir={tmp_path / 'run'}"]


def test_config_with_a_bad_column_fails_before_training(tiny_yaml: Path, saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_checked(tiny_yaml, overrides(saved, tmp_path, caption_column="text"))
    assert err.value.problems == [f"data.args.caption_column: no column 'text' in {saved / 'train'}; "
                                  "columns: image, caption, split, img_id"]


def test_tiny_config_validates_fits_and_evaluates(tiny_yaml: Path, saved: Path, tmp_path: Path) -> None:
    from distill.commands.cli import main
    from distill.training.stages import train

    config = load_checked(tiny_yaml, overrides(saved, tmp_path))
    assert config.data.dataset == "hf_datasets" and set(config.data.args) == {"path", "id_column"}
    metrics, _ = train(config)
    assert 0 <= metrics["val/rsum"] <= 600 and (tmp_path / "run" / "final.ckpt").is_file()
    assert main(["eval", str(tmp_path / "run" / "final.ckpt"), "--split", "test"]) == 0
