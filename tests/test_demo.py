"""The shrunken main job and `distill eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.commands.cli import main
from tests.conftest import shrink


def test_quick_demo_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"dataset", "models", "notes", "distilled_vs_alone"}
    assert report["distilled_vs_alone"]["metric"] == "rsum"
    assert report["notes"][0].startswith("Distilled - alone: RSUM ") and "95% paired bootstrap interval" in report["notes"][0]
    assert [m["name"] for m in report["models"]] == ["teacher", "student_alone", "student_distilled"]
    for m in report["models"]:
        assert set(m) == {"name", "params", "rsum", "i2t", "t2i", "image_ms", "text_ms", "zeroshot_top1", "zeroshot_task"}
        assert m["zeroshot_task"] == "embedded:colour" and 0 <= m["zeroshot_top1"] <= 100
        assert set(m["i2t"]) == set(m["t2i"]) == {"r1", "r5", "r10"}
        assert 0 <= m["rsum"] <= 600 and m["params"] > 0 and m["image_ms"] > 0
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "student_distilled" in (tmp_path / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "Distilled - alone: RSUM" in printed
    assert "time per phase:" in printed
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert set(timing["phases"]) == {"data", "teacher", "student alone", "student distilled", "evaluation"}
    assert (tmp_path / "student_alone" / "eval_test.ranks.npz").is_file()
    assert (tmp_path / "student_distilled" / "zeroshot_embedded_colour.json").is_file()
    assert (tmp_path / "teacher" / "towers" / "towers.json").is_file()


def test_eval_a_config_model_and_a_checkpoint(data_root: Path, tiny_towers: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    exp = Path("experiments/conaclip.yaml")
    out = tmp_path / "run"
    args = shrink(exp, data_root, out, tiny_towers, steps=2)
    assert main(["eval", str(exp), *args, "--model", "teacher", "--split", "test"]) == 0
    teacher = capsys.readouterr().out
    assert "rsum" in teacher
    assert main(["fit", str(exp), *args]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "final.ckpt")]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.strip().splitlines() if line.count(" ") >= 1)
    assert set(lines) >= {"i2t_r1", "t2i_r10", "rsum"}
    assert float(lines["rsum"]) == pytest.approx(sum(float(lines[k]) for k in lines if k != "rsum"), abs=0.05)


def test_eval_missing_checkpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "/no/such/run/final.ckpt"]) == 2
    assert "checkpoint '/no/such/run/final.ckpt' does not exist" in capsys.readouterr().err
