"""Efficiency measurements and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from distill.eval.efficiency import (
    count_parameters,
    encode_latency_ms,
    file_size_mb,
    peak_memory_mb,
)
from distill.eval.report import format_table, metrics_to_row, write_report
from distill.models.base import Encoder, l2norm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyEncoder(Encoder):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(3 * 8 * 8, 16)
        self.text = nn.Embedding(50, 16)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(self.image(pixel_values.flatten(1)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return l2norm(self.text(input_ids).mean(1))


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    frozen[0].requires_grad_(False)
    assert count_parameters(frozen) == 21
    assert count_parameters(frozen, trainable_only=True) == 5


def test_file_size_mb(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\0" * 2**19)
    assert file_size_mb(path) == 0.5


@pytest.mark.parametrize("batch", [1, 4])
def test_encode_latency(batch: int) -> None:
    encoder = TinyEncoder().train()
    text = {"input_ids": torch.randint(0, 50, (batch, 7)), "attention_mask": torch.ones(batch, 7)}
    out = encode_latency_ms(encoder, torch.randn(batch, 3, 8, 8), text, repeats=3, warmup=1)
    assert encoder.training  # mode restored
    for key in ("image_ms", "text_ms", "image_batch_ms", "text_batch_ms"):
        assert isinstance(out[key], float) and out[key] > 0
    assert out["image_batch_size"] == batch
    assert out["image_ms"] == pytest.approx(out["image_batch_ms"] / batch)


def test_peak_memory_sees_torch_allocations() -> None:
    peak = peak_memory_mb(lambda: torch.ones(64 * 2**20 // 4).add_(1))  # a 64 MiB tensor
    assert 0 <= peak < 1024
    if Path("/proc/self/clear_refs").exists():
        assert peak > 48


def metrics(scale: float) -> dict[str, float]:
    base = {"i2t_r1": 40.0, "i2t_r5": 70.0, "i2t_r10": 80.0,
            "t2i_r1": 30.0, "t2i_r5": 60.0, "t2i_r10": 72.0}  # fmt: skip
    out = {k: v * scale for k, v in base.items()}
    return out | {"rsum": sum(out.values())}


def rows() -> list[dict]:
    return [
        metrics_to_row("teacher_clip", metrics(1.0), 150_000_000, 40.0, 10.0),
        metrics_to_row("student_tiny", metrics(0.8), 15_000_000, 4.0, 1.0),
    ]


def test_metrics_to_row_shape() -> None:
    row = rows()[1]
    assert set(row) == {"name", "params", "rsum", "i2t", "t2i", "image_ms", "text_ms"}
    assert row["i2t"] == {"r1": 32.0, "r5": 56.0, "r10": 64.0}
    with pytest.raises(KeyError, match="rsum"):
        metrics_to_row("x", {k: 0.0 for k in metrics(1.0) if k != "rsum"}, 1, 1.0, 1.0)


def test_format_table_relative_columns() -> None:
    table = format_table(rows())
    lines = table.splitlines()
    assert len(lines) == 4 and "Speed-up" in lines[0]
    assert "| student_tiny | 15.00 |" in lines[3]
    assert lines[3].endswith("| 0.10× | 10.00× |")


def test_write_report(tmp_path: Path) -> None:
    out = write_report(rows(), tmp_path / "out", "coco_5k")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == out == {"dataset": "coco_5k", "models": rows(), "notes": []}
    assert list(report) == ["dataset", "models", "notes"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "teacher_clip" in md and "student_tiny" in md and "coco_5k" in md
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_write_report_rejects_bad_rows(tmp_path: Path) -> None:
    bad = rows()
    del bad[1]["text_ms"]
    with pytest.raises(ValueError, match="student_tiny.*text_ms"):
        write_report(bad, tmp_path, "coco_5k")
    with pytest.raises(ValueError, match="at least one row"):
        write_report([], tmp_path, "coco_5k")
