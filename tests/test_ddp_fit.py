"""`distill fit` end to end with two CPU processes (Lightning DDP over gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.training.trainer import metrics_csv

pytestmark = pytest.mark.ddp
ROOT = Path(__file__).resolve().parent.parent


def test_two_process_fit_writes_the_run_folder(tiny_yaml: Path) -> None:
    out = tiny_yaml.parent / "run"
    cmd = [sys.executable, "-m", "distill", "fit", str(tiny_yaml),
           "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Lightning starts rank 1 by re-running this command; a hang must not outlive the test
    done = subprocess.run(cmd, capture_output=True, timeout=300, env=env, cwd=tiny_yaml.parent)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    ckpt = torch.load(out / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("graph.models.student.") for k in ckpt["state_dict"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val/rsum", "val/i2t_r1", "val/t2i_r1"}
    assert 0 <= metrics["val/rsum"] <= 600
    with metrics_csv(out).open() as f:
        losses = [row["train/loss"] for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 6  # one logged loss per step: ranks step together, rank 0 logs
    assert all(torch.isfinite(torch.tensor(float(v))) for v in losses)


def test_fsdp_on_cpu_is_a_config_error(tiny_yaml: Path) -> None:
    from distill.core.check import load_checked
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^trainer.strategy: Lightning runs fsdp on GPUs only"):
        load_checked(tiny_yaml, ["trainer.strategy=fsdp", "trainer.accelerator=cpu"])
