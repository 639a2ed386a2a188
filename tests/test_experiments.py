"""Every shipped experiment validates and the CLI commands run end to end on tiny models."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.core.check import load_checked
from distill.training.trainer import metrics_csv
from tests.conftest import shrink

EXPERIMENTS = sorted(  # experiments/ablations/ holds sweep files, checked in tests/test_sweep.py
    p for p in (Path(__file__).parent.parent / "experiments").rglob("*.yaml") if "ablations" not in p.parts
)


def test_there_are_experiments() -> None:
    names = {p.name for p in EXPERIMENTS}
    assert {"clip_baseline.yaml", "conaclip.yaml", "teacher_pretrain.yaml"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_validates(path: Path, data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    # the experiment's own graph, only with the teacher checkpoint pointed at a tiny local one
    cfg = load_checked(path, shrink(path, data_root, tmp_path, tiny_towers))
    assert any(e.enabled for e in cfg.edges.values())


def read_metrics(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(metrics_csv(out))))


def test_fit_conaclip_end_to_end(data_root: Path, tiny_towers: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    exp = Path("experiments/conaclip.yaml")
    out = tmp_path / "run"
    assert main(["fit", str(exp), *shrink(exp, data_root, out, tiny_towers)]) == 0
    assert "val/rsum" in capsys.readouterr().out
    rows = read_metrics(out)
    columns = set(rows[0])
    enabled = [n for n, e in load_checked(exp, shrink(exp, data_root, out, tiny_towers)).edges.items() if e.enabled]
    assert {f"train/edge/{n}" for n in enabled} <= columns
    assert "train/edge/ti_si_fd" not in columns  # disabled in the YAML
    assert (out / "final.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()


def test_toggling_an_edge_from_the_command_line_removes_its_loss(data_root: Path, tiny_towers: Path,
                                                                 tmp_path: Path) -> None:
    exp = Path("experiments/conaclip.yaml")
    out = tmp_path / "run"
    args = shrink(exp, data_root, out, tiny_towers, steps=2)
    assert main(["fit", str(exp), *args, "edges.tt_si.enabled=false", "edges.ti_si_fd.enabled=true"]) == 0
    columns = set(read_metrics(out)[0])
    assert "train/edge/tt_si" not in columns and "train/edge/ti_st" in columns
    assert "train/edge/ti_si_fd" in columns


def test_graph_picture(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    exp = Path("experiments/conaclip.yaml")
    png = tmp_path / "graph.png"
    assert main(["graph", str(exp), *shrink(exp, data_root, tmp_path, tiny_towers), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("name,edges", [("mcad", ("si_st", "mcad_kl", "mcad_fd")), ("vldeformer", ("si_st",)),
                                        ("multi_teacher", ("si_st", "tt_si", "st_st_ens"))])
def test_fit_method_end_to_end(name: str, edges: tuple[str, ...], data_root: Path, tiny_towers: Path,
                               tmp_path: Path) -> None:
    exp = Path(f"experiments/{name}.yaml")
    out = tmp_path / "run"
    assert main(["fit", str(exp), *shrink(exp, data_root, out, tiny_towers)]) == 0
    rows = read_metrics(out)
    losses = [float(r[f"train/edge/{e}"]) for r in rows for e in edges if r.get(f"train/edge/{e}")]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (out / "final.ckpt").is_file()
