"""`distill fit` end to end with two CPU processes (Lightning DDP over gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader

from distill.training.trainer import metrics_csv
from tests.test_accumulate import batch, grads, rows

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


class FirstGradients(pl.Callback):
    """The graph's parameter gradients as the first optimizer step sees them."""

    def __init__(self) -> None:
        self.got: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: object) -> None:
        if self.got is None:
            self.got = grads(pl_module.graph)


def exact_module(tiny_yaml: Path) -> pl.LightningModule:
    from distill.core.check import load_checked
    from distill.training.module import DistillModule

    torch.manual_seed(0)  # the same initial weights in every process
    return DistillModule(load_checked(tiny_yaml, ["trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=null"]))


def lightning_worker(rank: int, port: int, yaml: str, queue: object) -> None:
    """One rank of a Lightning DDP run started the way torchrun starts it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="test")
    module, grab = exact_module(Path(yaml)), FirstGradients()
    mine = rows(batch(module.graph, 64), slice(32 * rank, 32 * rank + 32))  # 2 micro-batches of 16 per rank
    # find_unused_parameters=False: the strict reducer, which the K backward passes must not trip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False),
                         max_steps=2, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[grab], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([mine, mine], batch_size=None))
    final = [p.detach().numpy().copy() for p in module.graph.parameters() if p.requires_grad]
    queue.put((rank, [g.numpy() for g in grab.got or []], final))  # type: ignore[attr-defined]


def test_two_process_lightning_fit_accumulates_exactly(tiny_yaml: Path) -> None:
    """`trainer.accumulate_grad_batches: 2` under Lightning's DDP: 2 ranks x 2 x 16 rows give the
    gradients of one batch of 64 in one process, and the ranks stay identical."""
    from tests.test_ddp import spawn

    module = exact_module(tiny_yaml)
    module.graph(batch(module.graph, 64))["loss"].backward()
    expected = grads(module.graph)
    results = sorted(spawn(lightning_worker, 2, str(tiny_yaml), timeout=240), key=lambda r: r[0])
    for rank, got, _ in results:
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-7, msg=lambda m, r=rank: f"rank {r}: {m}")
    for a, b in zip(results[0][2], results[1][2]):  # after two steps, the same weights on both ranks
        assert (a == b).all()
