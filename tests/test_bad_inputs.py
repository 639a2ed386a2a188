"""A corpus of malformed configs and overrides: each ends with exit code 2 and exactly one
line `error: <yaml path or file>: ...`, never a traceback, before any weights load."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.commands.cli import main
from tests.conftest import write_yaml

OVERRIDES = [  # (overrides on the tiny config, the path the one error line starts with)
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=-4"], "data.batch_size"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.shuffle_buffer=-5"], "data.shuffle_buffer"),
    (["data.steps_per_epoch=0"], "data.steps_per_epoch"),
    (["data.batch_size=100000"], "data.batch_size"),
    (["optim.lr=-0.001"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.max_steps=-10"], "trainer.max_steps"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval"),
    (["trainer.limit_val_batches=-0.5"], "trainer.limit_val_batches"),
    (["trainer.limit_val_batches=0.25"], "trainer.limit_val_batches"),
    (["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps"),
    (["trainer.precision=17-mixed"], "trainer.precision"),
    (["trainer.strategy=dpp"], "trainer.strategy"),
    (["trainer.accelerator=gpux"], "trainer.accelerator"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.devices=lots"], "trainer.devices"),
    (["trainer.nonfinite=ignore"], "trainer.nonfinite"),
    (["eval.chunk_size=0"], "eval.chunk_size"),
    (["eval.split=dev"], "eval.split"),
    (["seed=-1"], "seed"),
    (["edges.si_tt.weight=-1"], "edges.si_tt.weight"),
    (["edges.si_tt.weight=.inf"], "edges.si_tt.weight"),
    (["edges.si_st.args.temperature=0.001"], "edges.si_st.args.temperature"),
    (["models.teacher.precision=fp8"], "models.teacher.precision"),
    (["cache.mode=off"], "cache.mode"),
    (["data.captions_per_image=some"], "data.captions_per_image"),
    (["edges.si_st.inputs=[student.image"], "override 'edges.si_st.inputs=[student.image'"),
    (["data=[1,2]"], "data"),
    (["models=[a,b]"], "models"),
    (["edges.si_st=[1]"], "edges.si_st"),
    (["stages.3.lr=0.1"], "override 'stages.3.lr'"),
    (["name=${nope}"], "name"),
    (["output_dir=${data.nothing}/x"], "output_dir"),
    (["edges.si_st.inputs=student.image"], "edges.si_st.inputs"),
    (["data.args=[1]"], "data.args"),
    (["trainer.max_steps=3.5"], "trainer.max_steps"),
]

FILES = [  # (YAML text extending the tiny config, the path the error line starts with)
    ("stages:\n  - {name: a, edges: [si_st], bogus: 1}\n", "stages[0].bogus"),
    ("stages:\n  - {name: a, edges: [si_st], max_steps: 0}\n", "stages[0].max_steps"),
    ("stages: {name: a}\n", "stages"),
    ("edges:\n  si_st: [1, 2]\n", "edges.si_st"),
    ("models:\n  student: 5\n", "models.student"),
    ("data:\n  args: [1]\n", "data.args"),
    ("data:\n  args: {n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: ROOT, n_trian: 3}\n", "data.args.n_trian"),
]


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (code, out.err)
    assert "Traceback" not in out.err + out.out
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0][len("error: "):]


@pytest.mark.parametrize(("overrides", "path"), OVERRIDES, ids=[" ".join(o) for o, _ in OVERRIDES])
def test_bad_override(tiny_yaml: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], path: str) -> None:
    line = one_error(capsys, main(["validate", str(tiny_yaml), *overrides]))
    assert line.startswith(f"{path}:") or line.startswith(f"{path} "), line


@pytest.mark.parametrize(("text", "path"), FILES, ids=[p for _, p in FILES])
def test_bad_file(tiny_yaml: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  text: str, path: str) -> None:
    cfg = write_yaml(tmp_path, "bad.yaml", f"extends: {tiny_yaml}\n" + text.replace("ROOT", str(data_root)))
    line = one_error(capsys, main(["validate", str(cfg)]))
    assert line.startswith(f"{path}:"), line


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_yaml(tmp_path, "broken.yaml", "name: x\nedges:\n  a: [unclosed\n  b: 1\n")
    line = one_error(capsys, main(["validate", str(cfg)]))
    assert line.startswith(f"{cfg}:") and "line " in line and "column " in line, line


def test_validate_reports_missing_data_files(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tiny_yaml.read_text().replace("dataset: synthetic", "dataset: webdataset")
    text = "\n".join(f'  args: {{urls: "{tmp_path}/missing-{{000..001}}.tar"}}' if line.startswith("  args: {n_train")
                     else line for line in text.splitlines())
    cfg = write_yaml(tmp_path, "shards.yaml", text)
    line = one_error(capsys, main(["validate", str(cfg)]))
    assert line.startswith("data.args.urls:") and "missing-000.tar" in line, line
