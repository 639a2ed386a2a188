"""A new edge from a plugin module named in YAML, in one file, trained end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.training.trainer import metrics_csv
from tests.conftest import write_yaml

REPO = Path(__file__).resolve().parent.parent

PLUGIN = '''
from torch import Tensor

from distill.losses import EdgeContext, EdgeLoss
from distill.registry import LOSSES


@LOSSES.register("cosine_margin_test")
class CosineMargin(EdgeLoss):
    """L = mean_i max(0, m - cos(P a_i, b_i))."""

    inputs = ("student", "teacher")
    same_dim = (("student", "teacher"),)
    projectable = True
    global_batch = False

    def __init__(self, *, margin: float = 0.9) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, student: Tensor, teacher: Tensor, *, ctx: EdgeContext) -> Tensor:
        cos = (self.project(student) * teacher).sum(-1)
        return (self.margin - cos).clamp_min(0).mean()
'''


def test_plugin_edge_validates_and_trains(tiny_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_edges_test.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(plugins))
    cfg = write_yaml(tmp_path, "plugin.yaml", f"""
        extends: {tiny_yaml}
        plugins: [my_edges_test]
        edges:
          ti_si_margin:
            loss: cosine_margin_test
            inputs: [student.image, teacher.image]
            weight: 0.5
            args: {{margin: 0.95}}
    """)
    assert main(["validate", str(cfg), "edges.ti_si_margin.args.marign=1"]) == 2
    err = capsys.readouterr().err
    assert "edges.ti_si_margin.args.marign: loss 'cosine_margin_test' takes no argument 'marign'" in err
    assert main(["fit", str(cfg), "trainer.max_steps=3"]) == 0
    rows = list(csv.DictReader(open(metrics_csv(tmp_path / "run"))))
    values = [r["train/edge/ti_si_margin"] for r in rows if r.get("train/edge/ti_si_margin")]
    assert len(values) == 3 and all(float(v) >= 0 for v in values)


def test_generic_loss_checks_run_over_plugin_losses(tmp_path: Path) -> None:
    """`--distill-plugins` imports a plugin before collection: the registry-wide loss test covers it."""
    (tmp_path / "my_edges_test.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_losses.py"),
         "--distill-plugins", "my_edges_test", "-k", "every_loss and cosine_margin_test"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 passed" in run.stdout
