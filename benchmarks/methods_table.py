"""The methods table of docs/results.md: each trained model on one split of the embedded benchmark.

Usage, from the repository root, after the runs exist:
    PYTHONPATH=. python benchmarks/methods_table.py \
        teacher=runs/teacher/towers \
        student_alone=runs/ablations/conaclip_edges/task_only/final.ckpt \
        conaclip=runs/ablations/conaclip_edges/full/final.ckpt \
        mcad=runs/ablations/mcad_mix/prob_a0.5/final.ckpt \
        vldeformer=runs/methods/vldeformer/final.ckpt:twin [--split test] [--repeats 15]

A target is a towers folder (a saved dual teacher), or a `.ckpt` written by `distill fit`
with an optional `:model` suffix (default: the run's `eval.model`). For each: R@1/5/10 both
ways and RSUM on the split, parameters, and per-item image and text encode latency (CPU,
batch 32, median of repeats, all models measured in this one process). The first target is
the reference of the relative columns. Writes benchmarks/results/methods/report.{md,json,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill.commands.demo import latency
from distill.core.check import load_checked
from distill.deploy.embedders import split_spec
from distill.eval.efficiency import count_parameters
from distill.eval.evaluate import evaluate_encoder
from distill.eval.report import format_table, metrics_to_row, write_report
from distill.models.dual_encoder import Towers
from distill.training.checkpoint import load_checkpoint

OUT = Path(__file__).parent / "results" / "methods"


def load_target(spec: str):  # noqa: ANN201
    """`folder` or `run.ckpt[:model]` -> (encoder, config used for its data)."""
    path, model = split_spec(spec)
    if path.suffix != ".ckpt":
        return Towers(path=spec).eval(), load_checked("experiments/clip_baseline.yaml")
    module = load_checkpoint(path)
    name = model or module.config.eval.model
    return module.graph.models[name].float().eval(), module.config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", help="name=folder or name=run.ckpt[:model]")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for item in args.targets:
        name, _, spec = item.partition("=")
        encoder, config = load_target(spec)
        metrics = evaluate_encoder(encoder, name, config, args.split)
        speed = latency(encoder, config, repeats=args.repeats)
        rows.append(metrics_to_row(name, metrics, count_parameters(encoder), speed["image_ms"], speed["text_ms"]))
        print(f"{name}: rsum {metrics['rsum']:.2f}", flush=True)
    write_report(rows, OUT, dataset=f"synthetic ({args.split} split)")
    print(format_table(rows))
    print(f"wrote {OUT}/report.md, report.json, report.png")


if __name__ == "__main__":
    main()
