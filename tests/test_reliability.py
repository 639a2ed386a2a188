"""Faults on purpose: checkpoints that would run code, data that yields no batch, NaN losses,
a damaged newest checkpoint. Each ends with one clear line or a correct fallback."""

from __future__ import annotations

import csv
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
import torch

from distill.commands.cli import main
from distill.training.trainer import PREVIOUS, metrics_csv
from tests.conftest import write_yaml

PWNED = "distill_test_pwned"


class Planted:
    """A pickle entry that runs a command when unpickled (what a booby-trapped file holds)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (os.system, (f"touch {self.marker}",))


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (code, out.err[-2000:])
    assert "Traceback" not in out.err and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def trapped(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / PWNED
    ckpt["callbacks"] = {"evil": Planted(marker)}
    path = tmp_path / "trapped.ckpt"
    torch.save(ckpt, path)
    return path, marker


def with_stored(tiny_checkpoint: Path, tmp_path: Path, **changes: object) -> Path:
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    cfg = ckpt["hyper_parameters"]["config"]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp_path / "stored.ckpt"
    torch.save(ckpt, path)
    return path


COMMANDS = [
    lambda ckpt, tmp: ["eval", str(ckpt)],
    lambda ckpt, tmp: ["export", str(ckpt), "--output", str(tmp / "export")],
    lambda ckpt, tmp: ["bench", str(ckpt), "--output", str(tmp / "bench"), "--repeats", "1", "--sizes", "10"],
    lambda ckpt, tmp: ["index", "mine", str(ckpt), "--model", "student", "--output", str(tmp / "neg.pt"), "--k", "2"],
    lambda ckpt, tmp: ["index", "build", "synthetic:test", "--model", str(ckpt), "--output", str(tmp / "s.idx")],
]
NAMES = ["eval", "export", "bench", "index mine", "index build"]


@pytest.mark.parametrize("argv", COMMANDS, ids=NAMES)
def test_a_booby_trapped_checkpoint_runs_nothing(trapped: tuple[Path, Path], tmp_path: Path, argv,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = trapped
    line = one_error(capsys, main(argv(path, tmp_path)))
    assert "not a readable distill checkpoint" in line and str(path) in line
    assert not marker.exists(), "unpickling ran the planted command"


@pytest.mark.parametrize("argv", COMMANDS, ids=NAMES)
@pytest.mark.parametrize("stored", ["plugin", "pipe"])
def test_a_stored_config_that_runs_code_is_refused(tiny_checkpoint: Path, tmp_path: Path, argv, stored: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    change = {"plugins": ["os"]} if stored == "plugin" else {"data__args": {"urls": "pipe:touch /tmp/x; cat a.tar"}}
    path = with_stored(tiny_checkpoint, tmp_path, **change)
    line = one_error(capsys, main(argv(path, tmp_path)))
    assert "would run code when loaded" in line and "--trust-checkpoint" in line
    assert ("imports 'os'" in line) if stored == "plugin" else ("runs a shell command" in line)


def test_trust_checkpoint_lets_a_plugin_config_load(tiny_checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = with_stored(tiny_checkpoint, tmp_path, plugins=["json"])  # a harmless module stands in
    assert main(["eval", str(path)]) == 2
    capsys.readouterr()
    assert main(["--trust-checkpoint", "eval", str(path)]) == 0


def bad_shards(folder: Path, n: int = 12) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "train-000.tar", "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", b"not a jpeg at all"), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / "train-000.tar")


def test_all_bad_training_data_stops_at_once(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = bad_shards(tmp_path / "shards")
    text = tiny_yaml.read_text().replace("dataset: synthetic", "dataset: webdataset")
    text = "\n".join(f"  args: {{urls: '{shards}'}}" if line.startswith("  args: {n_train") else line
                     for line in text.splitlines())
    cfg = write_yaml(tmp_path, "bad_data.yaml", text)
    start = time.perf_counter()
    line = one_error(capsys, main(["fit", str(cfg), "data.num_workers=0"]))
    assert time.perf_counter() - start < 60
    assert line.startswith("error: data: the training split has no usable sample on rank 0 of 1 (12 undecodable image)"), line


def test_a_batch_larger_than_a_workers_share_stops_at_once(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 48 images x 5 captions = 240 samples; two workers get 120 each, fewer than a batch of 200
    code = main(["fit", str(tiny_yaml), "data.batch_size=200", "data.num_workers=2"])
    line = one_error(capsys, code)
    assert line.startswith("error: data.num_workers: each of the 2 loader workers of rank 0 of 1 gets about 120"), line


NAN_PLUGIN = '''
import torch
from distill.losses import EdgeLoss
from distill.registry import LOSSES


@LOSSES.register("nan_after_test")
class NanAfter(EdgeLoss):
    """Zero until `after` calls, then NaN: a run that diverges mid-way."""

    inputs = ("a", "b")
    same_dim = ()
    global_batch = False

    def __init__(self, *, after: int = 3, every: int = 0) -> None:
        super().__init__()
        self.after, self.every, self.calls = after, every, 0

    def forward(self, a, b, *, ctx):
        self.calls += 1
        bad = self.calls > self.after and (not self.every or self.calls % self.every == 0)
        value = (a * 0).sum()
        return value + float("nan") if bad else value
'''


def nan_config(tiny_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **args: int) -> Path:
    (tmp_path / "nan_plugin_test.py").write_text(NAN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_yaml(tmp_path, "nan.yaml", f"""
        extends: {tiny_yaml}
        plugins: [nan_plugin_test]
        trainer: {{max_steps: 8, checkpoint_every_n_steps: 2}}
        edges:
          diverges:
            loss: nan_after_test
            inputs: [student.image, teacher.image]
            args: {args}
    """.replace("'", ""))


def test_a_nan_loss_mid_run_stops_with_the_checkpoint_intact(tiny_yaml: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = nan_config(tiny_yaml, tmp_path, monkeypatch, after=5)
    line = one_error(capsys, main(["fit", str(cfg)]))
    assert line.startswith("error: train: step 5: the loss is nan") and "diverges=nan" in line, line
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_skip_mode_drops_nonfinite_steps_and_counts_them(tiny_yaml: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = nan_config(tiny_yaml, tmp_path, monkeypatch, after=2, every=3)
    assert main(["fit", str(cfg), "trainer.nonfinite=skip", "trainer.max_steps=6"]) == 0
    rows = list(csv.DictReader(open(metrics_csv(tmp_path / "run"))))
    skipped = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert skipped and max(skipped) >= 1


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(tiny_yaml: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["fit", str(tiny_yaml), "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"]) == 0
    last, previous = out / "checkpoints" / "last.ckpt", out / "checkpoints" / PREVIOUS
    assert torch.load(previous, weights_only=True)["global_step"] == 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a node lost mid-write
    (out / "final.ckpt").unlink()
    with caplog.at_level("WARNING"):
        assert main(["fit", str(tiny_yaml), "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2",
                     "resume=last"]) == 0  # fmt: skip
    assert any("last.ckpt is damaged" in r.getMessage() for r in caplog.records)
    assert torch.load(out / "final.ckpt", weights_only=True)["global_step"] == 6
