"""Training steps per second of the ConaCLIP graph: live teacher vs cached teacher vs student alone.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/teacher_cache.py [--images 512] [--repeats 8] [--threads 1]

The experiment models: the student of experiments/clip_baseline.yaml (MobileNetV3-small at
64 px + 2-layer 128-wide BERT) and the teacher of experiments/teacher_pretrain.yaml
(ResNet-18 at 64 px + 4-layer 256-wide BERT), randomly initialised (speed does not depend
on the weights), batch 64. Variants: `live` = experiments/conaclip.yaml with the teacher
running; `cached` = the same config reading teacher.image/teacher.text from a cache built by
`distill cache` (the teacher is not loaded); `student` = experiments/clip_baseline.yaml
(the task edge only). A step = zero_grad, forward, backward, AdamW step, on batches
prefetched from each variant's own loader (so the timing is the model's, not the loader's).
`teacher_forward` times the teacher alone (no_grad, image + text of a
batch): a cache can at most remove that from a live step. The loaders are timed separately (main process, no workers): the cached variant does not
preprocess for the teacher. `--images` training images (5 captions each): the step time
does not depend on it; the cache build time scales with it. Variants alternate,
`--repeats` steps each. `--teacher-*` swap in a bigger teacher (the cache's gain grows
with the teacher's share of a step). Writes benchmarks/results/teacher_cache.json.

With `--augment V` every variant trains on augmented images (`data.augment`, random resized
crops): `live` runs the teacher on a fresh view every epoch, `cached` reads the teacher's
rows of one of V cached views per image (the student sees that view), `student` is the
student alone on augmented images (the limit). Writes teacher_cache_augment.json.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, bert, experiment, interleaved, median, write

from distill.config.schema import Config
from distill.core.build import build_graph
from distill.training.cache.build import fill_cache
from distill.training.cache.store import resolve_cache
from distill.training.module import DistillModule, param_groups
from distill.training.trainer import make_datamodule


def teacher_spec(image_model: str, width: int, layers: int) -> dict:
    """A frozen dual-encoder teacher (experiments/teacher_pretrain.yaml's by default)."""
    return {"type": "dual_encoder", "frozen": True, "args": {"image_model": image_model, "image_size": 64,
            "text_config": bert(width, layers), "embed_dim": 256, "pooling": "mean", "max_length": 40}}  # fmt: skip


def prepare(cfg: Config, cached: dict, n_batches: int) -> tuple:
    """(graph, optimizer, batches, loader seconds per batch) of one variant."""
    torch.manual_seed(0)
    graph = build_graph(cfg, cached).train()
    opt = torch.optim.AdamW(param_groups(graph, 0.05), lr=1e-4)
    loader = iter(make_datamodule(cfg, DistillModule(cfg, graph=graph)).train_dataloader())
    start = time.perf_counter()
    batches = [next(loader) for _ in range(n_batches)]
    return graph, opt, batches, (time.perf_counter() - start) / n_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared CPU)")
    parser.add_argument("--teacher-image", default="resnet18", help="timm model of the teacher's image tower")
    parser.add_argument("--teacher-width", type=int, default=256, help="teacher BERT width")
    parser.add_argument("--teacher-layers", type=int, default=4, help="teacher BERT depth")
    parser.add_argument("--augment", type=int, default=0, metavar="V",
                        help="train on augmented views; the cache holds V views per image (0: no augmentation)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("teacher_cache_augment.json" if args.augment else "teacher_cache.json")
    augment = ["data.augment.enabled=true"] if args.augment else []
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"data.args={{n_train: {args.images}, n_val: 0, n_test: 0, root: '{tmp}/data'}}",
                  f"data.batch_size={args.batch}", "data.num_workers=0", f"output_dir={tmp}/run",
                  f"cache.dir={tmp}/cache"]  # fmt: skip
        spec = teacher_spec(args.teacher_image, args.teacher_width, args.teacher_layers)
        views = [f"data.augment.views={args.augment}"] if args.augment else []
        live = experiment("conaclip", {"teacher": spec}, [*common, *augment, "cache.mode=never"])
        cached_cfg = experiment("conaclip", {"teacher": spec}, [*common, *augment, *views, "cache.mode=require"])
        alone = experiment("clip_baseline", {}, [*common, *augment])
        start = time.perf_counter()
        fill_cache(cached_cfg, batch_size=args.batch)
        build_s = time.perf_counter() - start
        cached = resolve_cache(cached_cfg)
        n = args.repeats + 2
        variants = {"live": prepare(live, {}, n), "cached": prepare(cached_cfg, cached, n), "student": prepare(alone, {}, n)}
        assert "teacher" not in variants["cached"][0].models

        batches = {k: itertools.cycle(v[2]) for k, v in variants.items()}

        def step(name: str) -> None:
            graph, opt, _, _ = variants[name]
            opt.zero_grad(set_to_none=True)
            graph(next(batches[name]))["loss"].backward()
            opt.step()

        teacher, live_batches = variants["live"][0].models["teacher"], itertools.cycle(variants["live"][2])

        @torch.no_grad()
        def teacher_forward() -> None:  # what the cache removes from a live step
            t = next(live_batches).inputs["teacher"]
            teacher.encode_image(t["pixel_values"])
            teacher.encode_text(t["input_ids"], t["attention_mask"])

        fns = {**{k: (lambda k=k: step(k)) for k in variants}, "teacher_forward": teacher_forward}
        times = interleaved(fns, args.repeats, warmup=1)
    step_s = {k: median(v) for k, v in times.items()}
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_per_s": {k: 1.0 / v for k, v in step_s.items()},
        "step_ms": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
        "loader_ms_per_batch": {k: 1e3 * v[3] for k, v in variants.items()},
        "cache_build_s": build_s,
        "cache_rows": {"images": args.images, "views": args.augment or None, "captions": 5 * args.images},
        "speedup_cached_vs_live": step_s["live"] / step_s["cached"],
        "cached_vs_student_time": step_s["cached"] / step_s["student"],
        # the most a cache can give: a live step is a cached step plus the teacher's forward
        "bound_speedup": (step_s["cached"] + step_s["teacher_forward"]) / step_s["cached"],
    }
    result["targets"] = {"cached_ge_2.5x_live": result["speedup_cached_vs_live"] >= 2.5,
                         "cached_within_1.2x_student": result["cached_vs_student_time"] <= 1.2}  # fmt: skip
    print(f"{'variant':<16}{'steps/s':>10}{'step ms':>10}{'loader ms/batch':>17}")
    for k in fns:
        loader = f"{result['loader_ms_per_batch'][k]:.0f}" if k in variants else ""
        print(f"{k:<16}{result['steps_per_s'][k]:>10.2f}{1e3 * step_s[k]:>10.0f}{loader:>17}")
    print(f"cached vs live: {result['speedup_cached_vs_live']:.2f}x faster (at most "
          f"{result['bound_speedup']:.2f}x: cached step + teacher forward); cached / student alone: "
          f"{result['cached_vs_student_time']:.2f}x the time; cache build: {build_s:.1f} s for "
          f"{args.images} images{f' x {args.augment} views' if args.augment else ''} + {5 * args.images} captions; targets: {result['targets']}")  # fmt: skip
    write(result, args.out)


if __name__ == "__main__":
    main()
