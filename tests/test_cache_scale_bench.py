"""benchmarks/cache_scale.py: the lookup and merge parts at a tiny size, through the production lookups."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling _common

import cache_scale  # noqa: E402

from distill.training.cache.arrays import npy_header  # noqa: E402

TINY = ["--sizes", "20000", "--shard-size", "10000", "--dim", "8", "--batch", "32", "--batches", "3",
        "--shards-per-batch", "2", "--merge-sizes", "20000"]  # fmt: skip


def test_lookup_and_merge_at_a_tiny_size(tmp_path: Path) -> None:
    out, where = tmp_path / "cache_scale.json", tmp_path / "scale"
    cache_scale.main([*TINY, "--parts", "lookup", "merge", "--dir", str(where), "--out", str(out)])
    saved = json.loads(out.read_text())
    cases = {(c["layout"], c["pattern"]): c for c in saved["lookup"]}  # each checked its first batch's rows
    patterns = ("uniform", "shards2", "shards2_reused")
    assert set(cases) == {(lay, p) for lay in ("global", "shards") for p in patterns} | {("global+random", "uniform")}
    for c in cases.values():
        assert c["n"] == 20000 and c["cold_ms"]["median"] > 0 and c["warm_ms"]["p90"] > 0
        assert c["bytes_on_disk"] >= 20000 * (2 * 8 + 11)
    assert cases[("global", "uniform")]["key_table_bytes_mapped"] == 20000 * 11
    assert cases[("shards", "uniform")]["files"] == 4  # 2 shards x (rows, keys)
    (merge,) = saved["merge"]
    assert merge["n"] == 20000 and merge["world"] == 2 and merge["merge_s"] > 0
    assert "uptime" in saved and not where.exists()  # everything it wrote is removed


def test_written_entries_are_valid_npy(tmp_path: Path) -> None:
    block = np.arange(5 * 3, dtype=np.float16).reshape(5, 3)
    files = cache_scale.write_entry(tmp_path, "shards", 12, block)
    assert len(files) == 6  # shards of 5, 5 and 2 rows
    assert [npy_header(f)[0] for f in files[-2:]] == [(2, 3), (2,)]
    assert all(npy_header(f)[2] == f.stat().st_size for f in files)
    keys = np.load(files[-1])
    assert keys.tolist() == [b"000000010/0", b"000000011/0"]
    np.testing.assert_array_equal(np.load(files[-2]), block[:2])


def test_refuses_when_the_disk_is_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_scale.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**9})())
    with pytest.raises(SystemExit, match=r"needs 15\.\d GB free under .*, .* has 1\.0 GB"):
        cache_scale.main(["--dir", str(tmp_path / "scale")])
    assert not (tmp_path / "scale").exists()
