"""The teacher cache laid out with the data shards: no global table, no merge, resumable."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import distill.training.cache.shards as shards_module
from distill.batch import Batch
from distill.commands.cli import main
from distill.core.check import load_checked
from distill.data.base import SampleKey, open_dataset
from distill.errors import ConfigError
from distill.training.cache.build import fill_cache
from distill.training.cache.shards import shard_dir
from distill.training.cache.store import check_entry, entries, resolve_cache
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
SHARDS, PER_SHARD = 4, 5


def write_textured_shards(folder: Path) -> str:
    """4 shards of 5 noise images (two captions each): views of them differ, unlike flat colours."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"{s:03d}.tar")) as tar:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
                key = f"s{s}i{i}"
                tar.write({"__key__": key, "png": buf.getvalue(),
                           "json": {"captions": [f"a red circle {s} {i}", f"a blue square {i} {s}"]}})
    return str(folder / f"{{000..{SHARDS - 1:03d}}}.tar")


@pytest.fixture
def sharded_yaml(tmp_path: Path) -> Path:
    urls = write_textured_shards(tmp_path / "shards")
    text = TINY.format(out=tmp_path / "run", data=tmp_path / "unused")
    text = text.replace("  dataset: synthetic\n", "  dataset: webdataset\n").replace(
        f"  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {tmp_path / 'unused'}}}\n",
        f"  args: {{urls: '{urls}', val_urls: '{tmp_path / 'shards' / '000.tar'}'}}\n")
    text = text.replace("batch_size: 16", "batch_size: 8").replace("eval_batch_size: 12", "eval_batch_size: 4")
    path = tmp_path / "sharded.yaml"
    path.write_text(text + f"cache: {{dir: '{tmp_path / 'cache'}', layout: shards}}\n")
    return path


def keys_batch(config_path: Path, *overrides: str) -> Batch:
    """Every training sample of the sharded data as one batch (keys that know their shard)."""
    config = load_checked(config_path, list(overrides))
    samples = list(open_dataset(config.data.dataset, config.data.args).train_samples(seed=0))
    return Batch(keys=[s[0] for s in samples], image_ids=torch.tensor([s[1] for s in samples]),
                 views=torch.arange(len(samples)) % 2)


def test_the_shard_layout_serves_the_rows_of_the_global_layout(sharded_yaml: Path, tmp_path: Path) -> None:
    views = ["data.augment.enabled=true", "data.augment.views=2"]
    fill_cache(load_checked(sharded_yaml, views))
    (folder,) = entries(tmp_path / "cache")
    assert sorted(p.name for p in (folder / "shards").iterdir()) == sorted(
        shard_dir(str(tmp_path / "shards" / f"{s:03d}.tar")) for s in range(SHARDS))
    assert not list(folder.glob("*.npy"))  # no global table
    other = [*views, "cache.layout=global", f"cache.dir={tmp_path / 'global'}"]
    fill_cache(load_checked(sharded_yaml, other))
    by_shard = resolve_cache(load_checked(sharded_yaml, [*views, "cache.mode=require"]))
    global_ = resolve_cache(load_checked(sharded_yaml, [*other, "cache.mode=require"]))
    batch = keys_batch(sharded_yaml)
    assert len(batch) == SHARDS * PER_SHARD * 2 and all(isinstance(k, SampleKey) for k in batch.keys)
    for node in ("teacher.image", "teacher.text"):
        assert type(by_shard[node]).__name__ == "ShardCachedNode"
        torch.testing.assert_close(by_shard[node](batch), global_[node](batch), atol=2e-3, rtol=0)


def test_a_build_killed_half_way_resumes_at_the_shard_level(
    sharded_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real = shards_module.write_shard

    def dies_after_two(where: Path, url: str, held: dict) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # the job is killed while encoding its third shard
        real(where, url, held)
        written.append(url)

    monkeypatch.setattr(shards_module, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(load_checked(sharded_yaml))
    folder = tmp_path / "cache" / next(p.name for p in (tmp_path / "cache").iterdir())
    assert not (folder / "meta.json").exists()  # incomplete: never read
    finished = {u: (folder / "shards" / shard_dir(u) / "done.json").stat().st_mtime_ns for u in written}
    rebuilt: list[str] = []
    monkeypatch.setattr(shards_module, "write_shard", lambda w, u, h: (real(w, u, h), rebuilt.append(u)))
    fill_cache(load_checked(sharded_yaml))
    assert len(rebuilt) == SHARDS - 2 and not set(rebuilt) & set(finished)  # only the unfinished shards
    assert {u: (folder / "shards" / shard_dir(u) / "done.json").stat().st_mtime_ns for u in written} == finished
    assert check_entry(folder, entries(folder.parent)[folder], ["image", "text"]) == []


def test_damage_is_found_and_named(sharded_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_cache(load_checked(sharded_yaml))
    (folder,) = entries(tmp_path / "cache")
    text = next((folder / "shards").glob("*/text.npy"))
    with open(text, "r+b") as f:  # one byte of one row, same size: only --verify can tell
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    assert main(["cache", str(sharded_yaml), "--verify"]) == 2
    assert f"{text}: damaged: its sha256 differs from the one in done.json" in capsys.readouterr().err
    with open(text, "r+b") as f:
        f.truncate(text.stat().st_size - 10)
    with pytest.raises(ConfigError, match=rf"{text}: \d+ bytes where done.json says \d+"):
        resolve_cache(load_checked(sharded_yaml, ["cache.mode=require"]))


def test_sample_keys_keep_their_shard_and_unsharded_data_is_refused(tiny_yaml: Path, tmp_path: Path) -> None:
    key = SampleKey("s0i1/0", "/data/000.tar")
    back = pickle.loads(pickle.dumps(key))
    assert back == "s0i1/0" and back.shard == "/data/000.tar" and hash(back) == hash("s0i1/0")
    karpathy = ["data.args.format=karpathy", f"cache.dir={tmp_path / 'cache'}", "cache.layout=shards"]
    with pytest.raises(ConfigError, match=r"^cache.layout: shards needs sharded training data"):
        fill_cache(load_checked(tiny_yaml, karpathy))


def test_fit_reads_the_shard_layout(sharded_yaml: Path, tmp_path: Path) -> None:
    views = ["data.augment.enabled=true", "data.augment.views=2"]
    assert main(["cache", str(sharded_yaml), *views]) == 0
    assert main(["fit", str(sharded_yaml), *views, "cache.mode=require", "data.num_workers=2", "trainer.max_steps=3"]) == 0
    assert (tmp_path / "run" / "final.ckpt").is_file()


@pytest.mark.ddp
def test_two_processes_build_disjoint_shards_into_the_single_process_cache(sharded_yaml: Path, tmp_path: Path) -> None:
    from tests.test_ddp import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "distill", "cache", str(sharded_yaml), f"cache.dir={tmp_path / 'two'}"]
    done = subprocess.run(cmd, capture_output=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    fill_cache(load_checked(sharded_yaml))
    two = resolve_cache(load_checked(sharded_yaml, [f"cache.dir={tmp_path / 'two'}", "cache.mode=require"]))
    one = resolve_cache(load_checked(sharded_yaml, ["cache.mode=require"]))
    batch = keys_batch(sharded_yaml)
    for node in ("teacher.image", "teacher.text"):
        torch.testing.assert_close(two[node](batch), one[node](batch), atol=2e-3, rtol=0)
