"""`distill demo`, the main job: a big teacher, a small student trained alone, the same
student distilled through the ConaCLIP graph, and a table comparing the three.

Every step is an ordinary experiment YAML run as `distill fit` runs it, so the demo shows
exactly what a user gets from `distill fit experiments/<name>.yaml`.
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from pathlib import Path

import torch

from distill.config.schema import Config
from distill.core.check import load_checked
from distill.data.base import open_dataset
from distill.eval.efficiency import count_parameters, encode_latency_ms
from distill.eval.evaluate import evaluate_encoder
from distill.eval.report import format_table, metrics_to_row, write_report
from distill.io import write_json
from distill.models.base import Encoder
from distill.training.stages import train

EXPERIMENTS = files("distill.experiments")
"""The experiment YAMLs (the repository's `experiments/`, installed as `distill.experiments`)."""
TEACHER = "runs/teacher/towers"
QUICK = [  # a smoke-sized run: tiny data, a few steps
    "data.args.n_train=64", "data.args.n_val=16", "data.args.n_test=16", "data.batch_size=16",
    "data.eval_batch_size=16", "data.num_workers=0", "trainer.max_steps=3", "optim.warmup_steps=1",
    "trainer.checkpoint_every_n_steps=2",
]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _config(name: str, overrides: list[str]) -> Config:
    return load_checked(str(EXPERIMENTS / f"{name}.yaml"), overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="runs/demo", help="run folder")
    p.add_argument("--quick", action="store_true", help="tiny data and few steps (smoke test)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    run_demo(args.output, quick=args.quick)
    return 0


def prepare_teacher(folder: Path, common: list[str], *, quick: bool) -> Path:
    """Train and save the embedded benchmark's teacher unless a saved one is already there."""
    if (folder / "towers.json").is_file():
        _say(f"teacher: cached at {folder}")
        return folder
    _say(f"teacher: training experiments/teacher_pretrain.yaml -> {folder}")
    extra = ["models.teacher.args.image_model=resnet10t"] if quick else []
    train(_config("teacher_pretrain", [*common, *extra, f"save_pretrained.teacher={folder}"]))
    return folder


def latency(encoder: Encoder, config: Config, repeats: int) -> dict[str, float]:
    """Per-item encode latency (ms, CPU, median of repeats) on a batch of 32 test items."""
    size = encoder.image_preprocess().size
    pixels = torch.randn(32, 3, size, size)
    captions = ["two small red circles left of a large blue square near the top"] * 32
    return encode_latency_ms(encoder.cpu(), pixels, encoder.text_preprocess()(captions), repeats=repeats)


def run_demo(output: str | Path = "runs/demo", *, quick: bool = False) -> dict:
    """Run the whole story and write `report.md`, `report.json`, `report.png` into `output`."""
    out = Path(output)
    start = time.perf_counter()
    common = list(QUICK) if quick else []
    if quick:
        common.append(f"data.args.root={out / 'data'}")
    teacher_dir = out / "teacher" / "towers" if quick else Path(TEACHER)

    _say("data: the embedded captioned-shapes benchmark")
    base = _config("clip_baseline", common)
    open_dataset(base.data.dataset, base.data.args).prepare()

    prepare_teacher(teacher_dir, [*common, f"output_dir={out / 'teacher_pretrain'}"], quick=quick)
    teacher_arg = f"models.teacher.args.path={teacher_dir}"

    _say("student alone: experiments/clip_baseline.yaml")
    _, alone = train(_config("clip_baseline", [*common, f"output_dir={out / 'student_alone'}"]))
    _say("student distilled: experiments/conaclip.yaml")
    distilled_cfg = _config("conaclip", [*common, teacher_arg, f"output_dir={out / 'student_distilled'}"])
    _, distilled = train(distilled_cfg)

    _say("evaluation on the test split")
    teacher = distilled.graph.models["teacher"].float()
    models = {"teacher": teacher, "student_alone": alone.graph.models["student"],
              "student_distilled": distilled.graph.models["student"]}
    rows = []
    for name, encoder in models.items():
        metrics = evaluate_encoder(encoder, name, distilled_cfg, "test")
        speed = latency(encoder, distilled_cfg, repeats=3 if quick else 15)
        rows.append(metrics_to_row(name, metrics, count_parameters(encoder), speed["image_ms"], speed["text_ms"]))
    report = write_report(rows, out, dataset=f"{distilled_cfg.data.dataset} (test split)")
    elapsed = time.perf_counter() - start
    write_json(out / "timing.json", {"seconds": elapsed})
    _say(f"report ({elapsed / 60:.1f} min) -> {out / 'report.md'}, report.json, report.png")
    print(format_table(rows))
    return report
