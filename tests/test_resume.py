"""`distill fit ... resume=last` after `kill -9` ends where an uninterrupted run ends.

The run is the ConaCLIP graph on tiny models (a BERT text tower with dropout, a ResNet with
batch norm) with two loader workers, 15 batches per epoch and 18 steps, so it crosses an
epoch boundary after resuming mid-epoch. What makes the two runs agree: the checkpoint
holds the optimiser, schedule and loop state (Lightning), the data position
(`EpochLoader.state_dict`: the resumed epoch replays the same batches in the same order,
workers skipping what was trained on) and the torch RNG state (the same dropout masks).
The same float operations then run in the same order on the same CPU, so the final
weights agree to float32 rounding: we allow 1e-5 absolute (weights are O(0.1), so this is
far below any real divergence: one different batch moves weights by ~lr = 1e-3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.core.check import load_checked
from distill.training.datamodule import DistillDataModule
from tests.conftest import shrink

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "conaclip.yaml"
STEPS = 18
PLUGIN = '''
import time

from torch import Tensor

from distill.losses import EdgeContext, EdgeLoss
from distill.registry import LOSSES


@LOSSES.register("pause_test")
class Pause(EdgeLoss):
    """Zero loss that sleeps: slows a run down so the test can kill it mid-way."""

    inputs = ("x",)
    same_dim = ()
    global_batch = False

    def __init__(self, *, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds

    def setup(self, dims: dict) -> None:  # one slot: nothing to project
        pass

    def forward(self, x: Tensor, *, ctx: EdgeContext) -> Tensor:
        time.sleep(self.seconds)
        return x.sum() * 0.0
'''


def command(out: Path, data_root: Path, towers: Path, *extra: str) -> list[str]:
    args = shrink(EXPERIMENT, data_root, out, towers, steps=STEPS)
    args += [
        "trainer.checkpoint_every_n_steps=3", "data.num_workers=2", "plugins=[pause_plugin]",
        "edges.pause.loss=pause_test", "edges.pause.inputs=[student.image]", "edges.pause.weight=0.0",
    ]
    return [sys.executable, "-m", "distill", "fit", str(EXPERIMENT), *args, *extra]


def student_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("graph.models.student.")}


@pytest.mark.parametrize("extra", [[], ["data.steps_per_epoch=9"]], ids=["one_pass", "steps"])
def test_loader_replays_the_rest_of_an_epoch(tiny_yaml: Path, extra: list[str]) -> None:
    cfg = load_checked(tiny_yaml, ["data.num_workers=2", *extra])

    def keys(skip: int | None) -> list[list[str]]:
        loader = DistillDataModule(cfg.data, {}).train_dataloader()  # no models: keys only
        if skip is not None:
            loader.load_state_dict({"epoch": 0, "batches": skip})
        return [b.keys for b in loader]

    full = keys(None)
    assert len(full) >= 7
    for skip in (3, 4):  # 3: the other worker's turn (ids rotate); 4: worker 0's turn
        assert keys(skip) == full[skip:]
    loader = DistillDataModule(cfg.data, {}).train_dataloader()
    loader.load_state_dict({"epoch": 5, "batches": 4})  # a state of another epoch is ignored
    assert [b.keys for b in loader] == full


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    (tmp_path / "pause_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "env": env}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = subprocess.Popen(command(whole, data_root, tiny_towers), **quiet)  # type: ignore[call-overload]
    victim = subprocess.Popen(command(cut, data_root, tiny_towers, "edges.pause.args.seconds=0.5"), **quiet)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoints" / "last.ckpt").is_file():
            assert victim.poll() is None, victim.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        victim.kill()  # SIGKILL: no cleanup, no final checkpoint
        victim.wait(timeout=30)
    except BaseException:
        reference.kill()
        raise
    finally:
        victim.kill()
    assert not (cut / "final.ckpt").exists(), "the run finished before it was killed"
    step = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < STEPS
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    resumed = subprocess.run(command(cut, data_root, tiny_towers, "resume=last"), capture_output=True, timeout=180, env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

    a, b = student_weights(whole / "final.ckpt"), student_weights(cut / "final.ckpt")
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert ma.keys() == mb.keys() and ma
    assert all(abs(ma[k] - mb[k]) < 1e-6 for k in ma), (ma, mb)
    assert (cut / "logs" / "version_1" / "metrics.csv").is_file()  # the resumed run logs apart
