"""Progress a user can see: status lines in a log file, a step bar in a terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.training.progress import StepProgress, duration


def test_a_log_file_gets_status_lines_with_eta(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(tiny_yaml), "trainer.progress_bar=true", "trainer.max_steps=6"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"^step (\d+)/6  loss [\d.]+  [\d.]+ s/step  ETA \w+$", out, flags=re.M)
    assert lines and lines[-1] == "6", out
    assert re.search(r"^trained 6 steps in \w+ \([\d.]+ s/step\)$", out, flags=re.M), out


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (0, 42, 95, 4000)] == ["0s", "42s", "1m35s", "1h06m"]


def test_the_terminal_bar_counts_steps(tiny_yaml: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert StepProgress().terminal
    assert main(["fit", str(tiny_yaml), "trainer.progress_bar=true", "trainer.max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert "train: 100%" in err and "4/4" in err and "Epoch" not in err, err[-500:]


def test_count_progress_prints_lines_with_rate_and_eta_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    from distill.training.progress import CountProgress

    shown = CountProgress("cache: models.teacher outputs", 100, "image", seconds=0.0)
    shown.update(25)
    shown.update(25)
    shown.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("cache: models.teacher outputs: 50/100 images, ")
    assert "images/s" in lines[1] and "ETA" in lines[1]
