"""Readers (webdataset shards, Karpathy JSON), splitting among ranks and the data module."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from distill.batch import Batch, RetrievalBatch
from distill.data import Part, split_items
from distill.data.karpathy import KarpathySplits
from distill.data.synthetic import TOKENIZER_DIR
from distill.data.webdataset import WebDatasetShards
from distill.errors import ConfigError
from distill.models.base import ImagePreprocess, TextPreprocess
from distill.training.datamodule import DistillDataModule


def _jpg(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, *, shards: int = 3, per_shard: int = 4, bad: bool = False) -> str:
    """Shards of 5-caption samples with ids 0..; with `bad`, shard 0 starts with a corrupt jpg and an empty caption."""
    folder.mkdir(parents=True, exist_ok=True)
    image_id = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:03d}.tar")) as tar:
            if bad and s == 0:
                tar.write({"__key__": "corrupt", "jpg": b"not a jpeg", "txt": "a red circle"})
                tar.write(
                    {"__key__": "empty", "jpg": _jpg((9, 9, 9)), "json": {"captions": ["", "  "]}}
                )
            for _ in range(per_shard):
                key = f"{image_id:09d}"
                captions = [f"caption {k} of image {image_id}" for k in range(5)]
                tar.write(
                    {
                        "__key__": key,
                        "jpg": _jpg((image_id * 20 % 255, 0, 0)),
                        "txt": captions[0],
                        "json": {
                            "key": key,
                            "caption": captions[0],
                            "captions": captions,
                            "image_id": image_id,
                        },
                    }
                )
                image_id += 1
    return str(folder / f"{{000..{shards - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def preprocess(tokenizer) -> dict:  # noqa: ANN001
    text = TextPreprocess(tokenizer, 24)
    return {
        "teacher": (ImagePreprocess(32), text),
        "student": (ImagePreprocess(32), text),
        "big": (ImagePreprocess(48), None),
    }


def cfg(dataset: str, args: dict, **over) -> SimpleNamespace:  # noqa: ANN003
    base = dict(
        dataset=dataset,
        args=args,
        batch_size=4,
        eval_batch_size=3,
        num_workers=0,
        shuffle_buffer=16,
        captions_per_image="all",
        seed=0,
        steps_per_epoch=None,
    )
    return SimpleNamespace(**{**base, **over})


def test_webdataset_reader_skips_and_counts_bad_samples(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    urls = write_shards(tmp_path / "shards", bad=True)
    ds = WebDatasetShards(urls=urls, val_urls=urls)
    assert ds.check() == []
    skipped = Counter()
    samples = list(ds.train_samples(skipped=skipped))
    assert len(samples) == 12 * 5 and skipped == {"undecodable_image": 1, "empty_caption": 1}
    dm = DistillDataModule(
        cfg("webdataset", {"urls": urls, "val_urls": urls}), preprocess(tokenizer)
    )
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches) == 15 and not hasattr(batches[0], "skipped")
    assert (
        dm.skipped == {"train/undecodable_image": 1, "train/empty_caption": 1}
        and dm.skipped_total("train") == 2
    )
    for b in dm.val_dataloader():
        dm.on_before_batch_transfer(b, 0)
    assert dm.skipped_total("val") == 2


def test_missing_shard_is_a_config_error_naming_it(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    urls = write_shards(tmp_path, shards=4)
    (tmp_path / "002.tar").unlink()
    dm = DistillDataModule(cfg("webdataset", {"urls": urls}), preprocess(tokenizer))
    with pytest.raises(ConfigError) as err:
        dm.check()
    assert err.value.problems[0].startswith("data.args.urls:") and str(tmp_path / "002.tar") in str(
        err.value
    )
    nothing = WebDatasetShards(
        urls="/nonexistent/{0..3}.tar", test_urls="https://host/x.tar"
    ).check()
    assert nothing == [
        "data.args.urls: no file matches /nonexistent/{0..3}.tar (missing /nonexistent/0.tar, "
        "/nonexistent/1.tar, /nonexistent/2.tar, /nonexistent/3.tar)"
    ]


def test_unknown_dataset_argument_is_a_config_error(tokenizer) -> None:  # noqa: ANN001
    with pytest.raises(
        ConfigError, match=r"data.args.url: dataset 'webdataset' takes no argument 'url'; did you mean 'urls'"
    ):
        DistillDataModule(cfg("webdataset", {"url": "x"}), preprocess(tokenizer))


def write_karpathy(tmp_path: Path) -> Path:
    images, entries = tmp_path / "imgs" / "sub", []
    images.mkdir(parents=True)
    for i, split in enumerate(["train", "restval", "train", "val", "val", "test"]):
        Image.new("RGB", (30, 20), (i * 30, 50, 50)).save(images / f"im{i}.jpg")
        sentences = [{"raw": f"photo {i} number {k}", "tokens": []} for k in range(5)]
        entries.append(
            {
                "filename": f"im{i}.jpg",
                "filepath": "sub",
                "imgid": 100 + i,
                "split": split,
                "sentences": sentences,
            }
        )
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return path


def test_karpathy_reader(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    ds = KarpathySplits(json_path=str(path), image_root=str(tmp_path / "imgs"))
    assert ds.check() == [] and ds.train_size("all") == 15 and ds.train_size("random") == 3
    assert sorted({s[1] for s in ds.train_samples()}) == [100, 101, 102]  # restval is training data
    random_pick = list(ds.train_samples(captions_per_image="random", seed=3))
    assert len(random_pick) == 3 and all(
        s[3] == f"photo {s[1] - 100} number {s[0].split('/')[1]}" for s in random_pick
    )
    val = list(ds.eval_images("val"))
    assert [i for i, _, _ in val] == [103, 104] and all(
        len(c) == 5 and im.size == (30, 20) for _, im, c in val
    )
    (tmp_path / "imgs" / "sub" / "im5.jpg").unlink()
    assert str(tmp_path / "imgs" / "sub" / "im5.jpg") in ds.check()[0]
    missing = KarpathySplits(json_path=str(tmp_path / "nope.json"), image_root=str(tmp_path))
    assert missing.check() == [f"data.args.json_path: file not found: {tmp_path / 'nope.json'}"]


def test_datamodule_shares_tensors_and_shapes(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    dm = DistillDataModule(
        cfg(
            "karpathy",
            {"json_path": str(write_karpathy(tmp_path)), "image_root": str(tmp_path / "imgs")},
        ),
        preprocess(tokenizer),
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(isinstance(b, Batch) and len(b) == 4 for b in batches)
    b = batches[0]
    t, s, big = b.inputs["teacher"], b.inputs["student"], b.inputs["big"]
    assert t["pixel_values"] is s["pixel_values"] and t["input_ids"] is s["input_ids"]
    assert t["pixel_values"].shape == (4, 3, 32, 32) and big["pixel_values"].shape == (4, 3, 48, 48)
    assert set(big) == {"pixel_values"} and t["input_ids"].shape == t["attention_mask"].shape
    assert b.image_ids.dtype == torch.int64
    rows = [(k, i) for b in batches for k, i in zip(b.keys, b.image_ids.tolist())]
    assert len(rows) == 12  # 15 pairs, the last partial batch dropped
    assert all(
        i == 100 + int(k[2]) and int(k.split("/")[1]) in range(5) for k, i in rows
    )  # key "im<i>/<caption>"
    assert max(Counter(i for _, i in rows).values()) >= 4  # the captions of one image share its id
    [val] = list(dm.val_dataloader())
    assert isinstance(val, RetrievalBatch) and val.image_ids.tolist() == [103, 104]
    assert val.text_image_ids.tolist() == [103] * 5 + [104] * 5
    assert (
        val.image_inputs["teacher"]["pixel_values"] is val.image_inputs["student"]["pixel_values"]
    )
    assert val.text_inputs["teacher"]["input_ids"].shape[0] == 10 and "big" not in val.text_inputs


def test_two_workers_fixed_steps_and_determinism(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    urls = write_shards(tmp_path / "shards", shards=2, per_shard=3)
    config = cfg("webdataset", {"urls": urls, "val_urls": urls}, num_workers=2, steps_per_epoch=7)
    dm = DistillDataModule(config, preprocess(tokenizer))
    first = list(dm.train_dataloader())
    assert len(first) == 7
    b = first[0]
    assert (
        b.inputs["teacher"]["pixel_values"] is b.inputs["student"]["pixel_values"]
    )  # sharing survives pickling
    assert b.inputs["big"]["pixel_values"] is not b.inputs["teacher"]["pixel_values"]
    again = DistillDataModule(config, preprocess(tokenizer))
    assert [x.keys for x in again.train_dataloader()] == [x.keys for x in first]
    val = list(dm.val_dataloader())
    assert sorted(i for v in val for i in v.image_ids.tolist()) == list(range(6))


def test_split_items_partitions_among_ranks_and_workers() -> None:
    urls = [f"/d/{i:03d}.tar" for i in range(10)]
    for world, workers in ((2, 1), (2, 2), (3, 2)):
        seen = []
        for rank in range(world):
            for worker in range(workers):
                kept, stride, offset = split_items(urls, Part(rank, world, worker, workers))
                assert (stride, offset) == (1, 0)
                seen += kept
        assert sorted(seen) == urls
    few = [split_items(urls[:1], Part(r, 2, w, 2)) for r in range(2) for w in range(2)]
    assert {(s, o) for _, s, o in few} == {
        (4, 0),
        (4, 1),
        (4, 2),
        (4, 3),
    }  # 1 shard: samples are split


def test_ddp_ranks_get_disjoint_eval_images(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    urls = write_shards(tmp_path / "shards", shards=4, per_shard=2)
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = DistillDataModule(
            cfg("webdataset", {"urls": urls, "val_urls": urls, "num_samples": 40}),
            preprocess(tokenizer),
        )
        assert dm.steps_per_epoch() == 5  # 40 pairs / (2 ranks * 4) keeps the ranks in step
        per_rank.append({i for b in dm.val_dataloader() for i in b.image_ids.tolist()})
        assert len(list(dm.train_dataloader())) == 5
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(range(8))


def test_skip_counts_reach_the_lightning_module(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logged: list[int] = []

        def training_step(self, batch: Batch, index: int) -> torch.Tensor:
            self.logged.append(self.trainer.datamodule.skipped_total("train"))
            return (batch.inputs["teacher"]["pixel_values"].mean() * self.w).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    urls = write_shards(tmp_path / "shards", bad=True)
    dm = DistillDataModule(
        cfg("webdataset", {"urls": urls}, steps_per_epoch=2), preprocess(tokenizer)
    )
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.logged == [2, 2, 4, 4]  # counts are cumulative over epochs
