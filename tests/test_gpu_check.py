"""benchmarks/gpu_check.sh / gpu_check.py: the plan it builds, failure reporting, and the tiny CPU run end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling _common

import gpu_check  # noqa: E402

MODEL_PHASES = [f"{g}/{m}" for m in ("eager", "compile") for g in ("live", "cached", "student")]


def plan(*argv: str) -> gpu_check.Plan:
    return gpu_check.build_plan(gpu_check.parse_args(list(argv)))


def test_gpu_plan_is_the_realistic_size() -> None:
    p = plan()
    assert (p.device, p.precision, p.batch, p.image_size, p.compile_backend) == ("cuda", "bf16-mixed", 256, 224, "inductor")
    assert p.phases == ("data", "cache", *MODEL_PHASES, "fit/cached")
    assert p.teacher["type"] == "open_clip" and p.teacher["args"]["model"] == "ViT-B-16"
    assert "pretrained" not in p.teacher["args"]  # random weights: nothing to download
    assert p.student["args"]["image_size"] == p.teacher["args"]["image_size"] == 224
    assert p.images * 5 >= p.prefetch * p.batch  # enough distinct rows for the prefetched batches
    assert p.out.endswith("benchmarks/results/gpu_check.json")


def test_tiny_plan_and_overrides() -> None:
    p = plan("--tiny")
    assert (p.device, p.precision, p.batch, p.threads, p.workers) == ("cpu", "32-true", 8, 1, 0)
    assert p.compile_backend == "aot_eager" and p.out.endswith("gpu_check_tiny.json")
    assert plan("--tiny", "--no-compile", "--fit-steps", "0").phases == ("data", "cache", "live/eager", "cached/eager", "student/eager")
    assert plan("--batch", "64", "--image-size", "160").student["args"]["image_size"] == 160
    assert plan("--compile-backend", "aot_eager").compile_backend == "aot_eager"
    with pytest.raises(SystemExit, match="--batch must be >= 2"):
        plan("--batch", "1")


@pytest.mark.parametrize("tiny", [False, True])
def test_plan_configs_pass_the_fit_checks(tiny: bool, tmp_path: Path) -> None:
    cfgs = gpu_check.configs(plan(*(["--tiny"] if tiny else [])), tmp_path)
    assert cfgs["cached"].cache.mode == "require" and cfgs["live"].cache.mode == "never"
    assert set(cfgs["student"].models) == {"student"} and len(cfgs["live"].edges) > len(cfgs["student"].edges)
    assert cfgs["live"].trainer.precision == ("32-true" if tiny else "bf16-mixed")


def test_a_failed_phase_is_recorded_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "check.json"
    p = dataclasses.replace(plan("--tiny", "--out", str(out)), phases=("data", "cached/eager"))  # no cache phase
    assert gpu_check.run(p) == 1
    result = json.loads(out.read_text())
    assert result["ok"] is False and result["phases"]["data"]["ok"] is True
    assert "cache" in result["phases"]["cached/eager"]["error"]
    assert "FAILED: cached/eager" in capsys.readouterr().out


def test_summary_ratios() -> None:
    rows = {"live/eager": {"ok": True, "samples_per_s": 100.0}, "cached/eager": {"ok": True, "samples_per_s": 300.0},
            "student/eager": {"ok": True, "samples_per_s": 400.0}, "student/compile": {"ok": False}}  # fmt: skip
    assert gpu_check.summary(rows) == {"cached_vs_live_eager": 3.0, "cached_share_of_student_limit_eager": 0.75}


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert list(result["phases"]) == ["data", "cache", "live/eager", "teacher_forward", *MODEL_PHASES[1:], "fit/cached"]
    for name in [*MODEL_PHASES, "teacher_forward", "fit/cached"]:
        row = result["phases"][name]
        assert row["ok"] and row["samples_per_s"] > 0, name
    assert result["phases"]["live/eager"]["flops_per_step"] > result["phases"]["cached/eager"]["flops_per_step"]
    assert "graph breaks" in result["phases"]["live/compile"]["note"]
    assert "phases ok" in done.stdout
