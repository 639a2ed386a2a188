"""`distill demo`, the main job: a big teacher, a small student trained alone, the same
student distilled through the ConaCLIP graph, and a table comparing the three.

Every step is an ordinary experiment YAML run as `distill fit` runs it, so the demo shows
exactly what a user gets from `distill fit experiments/<name>.yaml`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import torch

from distill.config.schema import Config
from distill.core.build import load_models
from distill.core.check import load_checked
from distill.data.base import open_dataset
from distill.eval.efficiency import count_parameters, encode_latency_ms
from distill.eval.evaluate import evaluate_ranks, save_evaluation
from distill.eval.report import format_table, metrics_to_row, write_report
from distill.eval.stats import compare_runs
from distill.eval.zeroshot import evaluate_zeroshot, open_task, save_zeroshot
from distill.io import write_json
from distill.models.base import Encoder
from distill.training.progress import duration
from distill.training.stages import train

EXPERIMENTS = files("distill.experiments")
"""The experiment YAMLs (the repository's `experiments/`, installed as `distill.experiments`)."""
TEACHER = "teacher/towers"
"""Where the demo saves its teacher, inside the demo's folder: `distill fit
experiments/teacher_pretrain.yaml` trains the full-budget one into runs/teacher/towers."""
BUDGET = {"teacher": ["trainer.max_steps=175", "optim.warmup_steps=20"],
          "students": ["trainer.max_steps=250", "optim.warmup_steps=25"]}
"""The demo's training budget, chosen to finish in under 10 minutes on a 2-core CPU
(docs/results.md, "The demo's budget": where the time goes); the experiments' own budgets
are 600 and 400 steps."""
ZEROSHOT = "embedded:colour"
"""The zero-shot task the report shows next to RSUM: name the colour of one object
(docs/zeroshot.md; shape and count stay at chance at this budget)."""
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


def latency(encoder: Encoder, config: Config, repeats: int) -> dict[str, float]:
    """Per-item encode latency (ms, CPU, median of repeats) on a batch of 32 test items."""
    pixels = torch.randn(32, 3, *encoder.image_preprocess().out_size)
    captions = ["two small red circles left of a large blue square near the top"] * 32
    return encode_latency_ms(encoder.cpu(), pixels, encoder.text_preprocess()(captions), repeats=repeats)


class Phases:
    """Wall time of each phase of the demo, printed as it goes and as a table at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        _say(f"{name}: {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"   {name}: {duration(self.seconds[name])}", flush=True)

    def table(self) -> str:
        total = sum(self.seconds.values())
        lines = [f"  {name:<20} {duration(sec):>7}  {100 * sec / total:4.0f}%" for name, sec in self.seconds.items()]
        return "\n".join([*lines, f"  {'total':<20} {duration(total):>7}"])


def run_demo(output: str | Path = "runs/demo", *, quick: bool = False) -> dict:
    """Run the whole story and write `report.md`, `report.json`, `report.png` into `output`.

    The distilled student runs the teacher live: building the teacher-output cache encodes
    every training image and all five captions of each (2 min here), more than one short
    run's teacher forward passes cost (measured in docs/results.md); the cache pays off
    across the runs of a sweep. The report gives the distilled student's RSUM gain over the
    student alone with a 95% paired bootstrap interval over the test queries.
    """
    out = Path(output)
    phase = Phases()
    common = list(QUICK) if quick else []
    common += ["cache.mode=never"]  # the teacher runs live (see above); a stale cache elsewhere cannot matter
    if quick:
        common += [f"data.args.root={out / 'data'}"]
    teacher_dir = out / TEACHER
    teacher_budget, student_budget = ([], []) if quick else (BUDGET["teacher"], BUDGET["students"])

    with phase("data", "the embedded captioned-shapes benchmark"):
        base = _config("clip_baseline", common)
        open_dataset(base.data.dataset, base.data.args).prepare()
    if (teacher_dir / "towers.json").is_file():
        _say(f"teacher: cached at {teacher_dir}")
    else:
        with phase("teacher", f"training experiments/teacher_pretrain.yaml -> {teacher_dir}"):
            extra = ["models.teacher.args.image_model=resnet10t"] if quick else []
            train(_config("teacher_pretrain", [*common, *teacher_budget, *extra, f"output_dir={out / 'teacher_pretrain'}",
                                               f"save_pretrained.teacher={teacher_dir}"]))  # fmt: skip
    with phase("student alone", "experiments/clip_baseline.yaml"):
        _, alone = train(_config("clip_baseline", [*common, *student_budget, f"output_dir={out / 'student_alone'}"]))
    distilled_cfg = _config("conaclip", [*common, *student_budget, f"models.teacher.args.path={teacher_dir}",
                                         f"output_dir={out / 'student_distilled'}"])  # fmt: skip
    with phase("student distilled", "experiments/conaclip.yaml (the teacher runs live: see run_demo)"):
        _, distilled = train(distilled_cfg)
    with phase("evaluation", "the test split, per-query ranks, zero-shot colour, encode latency"):
        teacher = load_models(distilled_cfg, ["teacher"])["teacher"].float().eval()
        models = {"teacher": teacher, "student_alone": alone.graph.models["student"],
                  "student_distilled": distilled.graph.models["student"]}  # fmt: skip
        rows, ranks = [], {}
        task = open_task(ZEROSHOT, distilled_cfg.data)
        for name, encoder in models.items():
            metrics, ranks[name] = evaluate_ranks(encoder, name, distilled_cfg, "test")
            save_evaluation(out / name, "test", metrics, ranks[name])
            zeroshot = evaluate_zeroshot(encoder, name, task, batch_size=distilled_cfg.data.eval_batch_size)
            save_zeroshot(out / name, zeroshot)
            speed = latency(encoder, distilled_cfg, repeats=3 if quick else 15)
            rows.append(metrics_to_row(name, metrics, count_parameters(encoder), speed["image_ms"], speed["text_ms"],
                                       zeroshot=zeroshot))
        gain = compare_runs([ranks["student_distilled"]], [ranks["student_alone"]], ["rsum"])[0]
    verdict = "resolved: the interval excludes 0" if gain.resolved else "not resolved: the interval includes 0"
    finding = (f"Distilled - alone: RSUM {gain.delta:+.1f}, 95% paired bootstrap interval over the test queries "
               f"[{gain.low:+.1f}, {gain.high:+.1f}] ({verdict}); sign test p = {gain.p_sign:.2g}.")  # fmt: skip
    report = write_report(rows, out, dataset=f"{distilled_cfg.data.dataset} (test split)", notes=[finding])
    report["distilled_vs_alone"] = gain.as_dict()
    write_json(out / "report.json", report)
    write_json(out / "timing.json", {"seconds": sum(phase.seconds.values()), "phases": phase.seconds})
    _say(f"report -> {out / 'report.md'}, report.json, report.png")
    print(format_table(rows))
    print(f"\n{finding}\n\ntime per phase:\n{phase.table()}")
    return report
