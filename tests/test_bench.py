"""`distill bench`: the efficiency report of checkpoints and exports, on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.commands.cli import main
from distill.deploy.bench import top_k
from distill.deploy.export import export_checkpoint

ROW_KEYS = {"name", "kind", "embed_dim", "params", "size_mb", "image_ms_b1", "text_ms_b1", "image_ms", "text_ms", "peak_mb", "search_ms"}


def test_bench_teacher_student_and_export_side_by_side(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = export_checkpoint(tiny_checkpoint, format="onnx", output=tmp_path / "student_onnx")
    out = tmp_path / "bench"
    argv = ["bench", f"{tiny_checkpoint}:teacher", str(tiny_checkpoint), str(export), "--output", str(out),
            "--batch-size", "4", "--repeats", "2", "--warmup", "1", "--sizes", "100", "2000", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["batch_size"] == 4 and report["settings"]["sizes"] == [100, 2000]
    teacher, student, onnx = report["targets"]
    assert [r["name"] for r in report["targets"]] == ["run:teacher", "run:student", "student_onnx"]
    assert [r["kind"] for r in report["targets"]] == ["checkpoint", "checkpoint", "onnx"]
    assert [r["embed_dim"] for r in report["targets"]] == [24, 16, 16]
    for row in report["targets"]:
        assert set(row) == ROW_KEYS
        assert row["params"] > 0 and row["size_mb"] > 0 and row["peak_mb"] >= 0
        assert all(row[k] > 0 for k in ("image_ms_b1", "text_ms_b1", "image_ms", "text_ms"))
        assert set(row["search_ms"]) == {"100", "2000"} and all(v > 0 for v in row["search_ms"].values())
    assert teacher["params"] > student["params"]
    assert onnx["params"] == pytest.approx(student["params"], rel=0.01)  # the same weights, stored in ONNX
    assert onnx["size_mb"] == pytest.approx(student["size_mb"], rel=0.1)
    assert onnx["search_ms"] == student["search_ms"]  # one curve per width
    md = (out / "bench.md").read_text()
    assert "| run:teacher | checkpoint | 24 |" in md and "Search ms 2K" in md and "1.00×" in md
    assert (out / "bench_search.png").stat().st_size > 5_000
    assert "| student_onnx | onnx | 16 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/no/such/run/final.ckpt", "error: bench target '/no/such/run/final.ckpt': no such checkpoint"),
        ("/no/such/run/final.ckpt:teacher", "no such checkpoint (.ckpt[:model]) or export folder"),
    ],
)
def test_bench_missing_target_exits_2(target: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", target, "--output", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bench_folder_without_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tmp_path), "--output", str(tmp_path / "b")]) == 2
    assert "not a `distill export` folder" in capsys.readouterr().err


def test_top_k_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    index, query = torch.randn(500, 8, generator=gen), torch.randn(8, generator=gen)
    np.testing.assert_array_equal(top_k(index, query, 10).numpy(), np.argsort(-(index @ query).numpy())[:10])
    assert len(top_k(index[:3], query, 10)) == 3
