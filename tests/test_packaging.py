"""The installed package is complete: a plain (non-editable) install runs `distill demo`."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "data_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    return next(out.glob("distill-*.whl"))


def test_wheel_ships_the_experiments_and_assets(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (REPO / "experiments").rglob("*.yaml"):
        assert f"distill/experiments/{yaml.relative_to(REPO / 'experiments').as_posix()}" in names
    assert "distill/assets/search.html" in names and "distill/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_plain_install_runs_the_demo_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pth = next((venv / "lib").glob("python3*/site-packages"))
    (pth / "deps.pth").write_text(site.getsitepackages()[0] + "\n")  # this venv's dependencies, not its distill
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    run = subprocess.run([str(venv / "bin" / "distill"), "demo", "--quick", "-o", str(tmp_path / "demo")],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "demo" / "report.md").is_file()
