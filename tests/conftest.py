"""Shared fixtures: tiny configs that run on a CPU in seconds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

TINY = """
name: tiny
output_dir: {out}
models:
  student:
    type: tiny_dual
    args: {{embed_dim: 16, image_size: 32}}
  teacher:
    type: tiny_dual
    frozen: true
    args: {{embed_dim: 24, image_size: 32}}
edges:
  si_st:
    loss: infonce
    inputs: [student.image, student.text]
    args: {{temperature: 0.1, learnable: true}}
  si_tt:
    loss: infonce
    inputs: [student.image, teacher.text]
  st_ti_kl:
    loss: similarity_kl
    inputs: [student.text, student.image, teacher.text, teacher.image]
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
  batch_size: 16
  eval_batch_size: 12
  num_workers: 0
  shuffle_buffer: 50
trainer:
  max_steps: 6
  log_every_n_steps: 1
  checkpoint_every_n_steps: 3
  progress_bar: false
optim:
  warmup_steps: 2
"""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny embedded dataset per test session (generated on first use)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def tiny_yaml(tmp_path: Path, data_root: Path) -> Path:
    """A tiny teacher + student graph config written to a temporary folder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "run", data=data_root))
    return path


def write_yaml(folder: Path, name: str, text: str) -> Path:
    """Write a dedented YAML file and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path
