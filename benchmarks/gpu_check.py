"""GPU check: samples/s and peak memory of ConaCLIP training at a realistic size, live vs cached teacher vs student alone, eager vs torch.compile.

Usage, from the repository root (`benchmarks/gpu_check.sh` runs this and fails on any failure):
    bash benchmarks/gpu_check.sh               # one GPU: ViT-B/16 teacher, batch 256, bf16-mixed, 224 px
    bash benchmarks/gpu_check.sh --tiny        # CPU: tiny models, batch 8, fp32, 1 thread (~1-2 min)
    PYTHONPATH=. python benchmarks/gpu_check.py --plan [--tiny]   # print what would run, load nothing

Models, randomly initialised (speed does not depend on the weights; nothing is downloaded):
teacher = open_clip `ViT-B-16` (stored in bf16, as experiments/cluster/conaclip_cluster.yaml
does), student = `dual_encoder` MobileNetV3-large + 4-layer 384-wide BERT. Graphs: `live` =
experiments/conaclip.yaml with the teacher running; `cached` = the same config reading the
teacher's outputs from a cache built by `fill_cache` (`cache.mode=require`, the teacher is
not loaded); `student` = experiments/clip_baseline.yaml with the same student (task edge
only): the student-only limit, the ceiling that the cached graph approaches.

Data: the embedded benchmark (`data.dataset: synthetic`) generated at the plan's image size
into a temporary folder. The model phases time batches prefetched from each graph's own
loader and held on the device (captions padded to one length, so a compiled student sees
one shape), i.e. model throughput, not loader throughput. The last phase (`fit/cached`)
runs the real path, `distill.training.fit.fit` (Lightning, bf16-mixed, the real loader
with its JPEG decoding), and times its steps with a callback.

A model-phase step = zero_grad, forward under autocast (what trainer.precision=bf16-mixed
does), backward, gradient clipping at trainer.gradient_clip_val, AdamW step. samples/s =
steps x batch / wall seconds of the timed steps after warmup (the device synchronised at
both ends); peak memory = torch.cuda.max_memory_allocated over the timed steps (weights,
optimizer state and activations); TFLOP/s = matmul/conv FLOPs of one eager step
(torch.utils.flop_counter) x steps / seconds. `/compile` phases apply torch.compile to the
student's encode_image / encode_text here only: distill has no compile switch. A phase
that fails is recorded with its error, the others still run; the JSON is rewritten after
every phase; the exit status is 1 when any phase failed. Writes
benchmarks/results/gpu_check.json (gpu_check_tiny.json for --tiny).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import RESULTS, bert, experiment

from distill.batch import Batch
from distill.config.schema import Config
from distill.core.check import checked
from distill.io import write_json

TEACHER = {"type": "open_clip", "frozen": True, "precision": "bf16", "args": {"model": "ViT-B-16"}}
STUDENT = {"type": "dual_encoder", "args": {"image_model": "mobilenetv3_large_100", "image_size": 224,
           "text_config": bert(384, 4), "embed_dim": 256, "pooling": "mean", "max_length": 40}}  # fmt: skip
TINY_TEACHER = {"type": "open_clip", "frozen": True, "args": {"model": "ViT-B-16", "image_size": 32, "config": {
    "embed_dim": 32, "vision_cfg": {"width": 64, "layers": 2, "head_width": 32}, "text_cfg": {"width": 64, "heads": 2, "layers": 2}}}}  # fmt: skip
TINY_STUDENT = {"type": "dual_encoder", "args": {"image_model": "mobilenetv3_small_050", "image_size": 32,
                "text_config": bert(32, 1), "embed_dim": 32, "pooling": "mean", "max_length": 40}}  # fmt: skip
GRAPHS = ("live", "cached", "student")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run does, decided from the arguments before anything loads."""

    tiny: bool
    device: str
    precision: str
    batch: int
    image_size: int
    images: int
    warmup: int
    steps: int
    prefetch: int
    workers: int
    threads: int | None
    compile_backend: str | None
    fit_steps: int
    budget_s: float
    teacher: dict[str, Any]
    student: dict[str, Any]
    out: str
    phases: tuple[str, ...]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, batch 8, fp32: the plumbing, in ~1-2 min")
    p.add_argument("--plan", action="store_true", help="print the plan as JSON and exit (loads nothing)")
    p.add_argument("--batch", type=int, help="rows per step (256; tiny 8)")
    p.add_argument("--steps", type=int, help="timed steps per phase after warmup (30; tiny 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first; they include compilation (5; tiny 2)")
    p.add_argument("--images", type=int, help="training images generated, 5 captions each (1024; tiny 16)")
    p.add_argument("--image-size", type=int, help="pixels of the generated images and of both models (224; tiny 32)")
    p.add_argument("--compile-backend", help="torch.compile backend (inductor; tiny aot_eager: traced, no code generation)")
    p.add_argument("--no-compile", action="store_true", help="skip the /compile phases")
    p.add_argument("--fit-steps", type=int, help="timed steps of the Lightning phase, 0 to skip it (20; tiny 2)")
    p.add_argument("--budget-s", type=float, help="phases not started by then are failed as over budget (420; tiny 240)")
    p.add_argument("--out", type=Path, help="JSON path (benchmarks/results/gpu_check.json; tiny gpu_check_tiny.json)")
    return p.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    """The run's plan: GPU defaults, or the tiny CPU ones with `--tiny`; explicit options win."""
    tiny = bool(args.tiny)

    def pick(value: Any, gpu: Any, cpu: Any) -> Any:
        return value if value is not None else (cpu if tiny else gpu)

    size = pick(args.image_size, 224, 32)
    teacher, student = (TINY_TEACHER, TINY_STUDENT) if tiny else (TEACHER, STUDENT)
    teacher = json.loads(json.dumps(teacher))
    student = json.loads(json.dumps(student))
    teacher["args"]["image_size"], student["args"]["image_size"] = size, size
    backend = None if args.no_compile else pick(args.compile_backend, "inductor", "aot_eager")
    fit_steps = pick(args.fit_steps, 20, 2)
    batch, steps, warmup = pick(args.batch, 256, 8), pick(args.steps, 30, 3), pick(args.warmup, 5, 2)
    for name, value, least in (("--batch", batch, 2), ("--steps", steps, 1), ("--warmup", warmup, 1), ("--image-size", size, 16)):
        if value < least:
            raise SystemExit(f"gpu_check: {name} must be >= {least}, got {value}")
    phases = ["data", "cache", *[f"{g}/eager" for g in GRAPHS], *([f"{g}/compile" for g in GRAPHS] if backend else [])]
    phases += ["fit/cached"] if fit_steps > 0 else []
    prefetch = 2 if tiny else 4
    out = args.out or RESULTS / ("gpu_check_tiny.json" if tiny else "gpu_check.json")
    return Plan(
        tiny=tiny, device="cpu" if tiny else "cuda", precision="32-true" if tiny else "bf16-mixed",
        batch=batch, image_size=size, images=pick(args.images, max(1024, prefetch * batch), 2 * batch),
        warmup=warmup, steps=steps, prefetch=prefetch, workers=0 if tiny else 8, threads=1 if tiny else None,
        compile_backend=backend, fit_steps=fit_steps, budget_s=pick(args.budget_s, 420.0, 240.0),
        teacher=teacher, student=student, out=str(out), phases=tuple(phases),
    )  # fmt: skip


def configs(plan: Plan, tmp: Path) -> dict[str, Config]:
    """The three graphs' configs, checked as `distill fit` checks them."""
    common = [f"data.args={{n_train: {plan.images}, n_val: 0, n_test: 0, image_size: {plan.image_size}, root: '{tmp}/data'}}",
              f"data.batch_size={plan.batch}", f"data.num_workers={plan.workers}", f"output_dir={tmp}/run",
              f"cache.dir={tmp}/cache", f"trainer.precision={plan.precision}", f"trainer.accelerator={'gpu' if plan.device == 'cuda' else 'cpu'}",
              "trainer.devices=1", "trainer.limit_val_batches=0", "trainer.progress_bar=false", "trainer.loggers=[]"]  # fmt: skip
    models = {"teacher": plan.teacher, "student": plan.student}
    return {
        "live": checked(experiment("conaclip", models, [*common, "cache.mode=never"])),
        "cached": checked(experiment("conaclip", models, [*common, "cache.mode=require"])),
        "student": checked(experiment("clip_baseline", {"student": plan.student}, common)),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(plan: Plan) -> Any:
    """What Lightning's trainer.precision does around the forward pass."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if plan.precision == "bf16-mixed" else nullcontext()


def pad_text(batches: list[Batch]) -> list[Batch]:
    """Captions padded to the longest of all batches (mask 0), per model: one shape for torch.compile."""
    for name in {m for b in batches for m, d in b.inputs.items() if "input_ids" in d}:
        length = max(b.inputs[name]["input_ids"].shape[1] for b in batches)
        for b in batches:
            d = dict(b.inputs[name])
            extra = length - d["input_ids"].shape[1]
            d["input_ids"], d["attention_mask"] = F.pad(d["input_ids"], (0, extra)), F.pad(d["attention_mask"], (0, extra))
            b.inputs[name] = d
    return batches


def prepare(plan: Plan, cfg: Config) -> tuple[Any, list[Batch]]:
    """(graph on the device, prefetched batches on the device) of one config."""
    from distill.core.build import build_graph
    from distill.training.cache.store import resolve_cache
    from distill.training.module import DistillModule
    from distill.training.trainer import make_datamodule

    torch.manual_seed(0)
    graph = build_graph(cfg, resolve_cache(cfg)).train()
    loader = iter(make_datamodule(cfg, DistillModule(cfg, graph=graph)).train_dataloader())
    batches = pad_text([next(loader) for _ in range(plan.prefetch)])
    del loader
    return graph.to(plan.device), [b.to(plan.device) for b in batches]


def compile_student(graph: Any, backend: str) -> None:
    """torch.compile the student's two encoders, on this instance only (no library switch)."""
    student = graph.models["student"]
    student.encode_image = torch.compile(student.encode_image, backend=backend)
    student.encode_text = torch.compile(student.encode_text, backend=backend)


def dynamo_counts() -> tuple[int, int]:
    """(graphs Dynamo compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def step_flops(graph: Any, batch: Batch, models: set[str] | None = None) -> float:
    """Matmul/conv FLOPs of one training step (torch.utils.flop_counter), from forward passes
    only: each computed node's forward x3 for a trained model (forward + backward), x1 for a
    frozen one. Not counted on the backward itself, which the counter overcounts for
    depthwise convolutions (26x on MobileNetV3: it ignores groups); nn.MultiheadAttention's
    fused inference path, which the counter does not see, is off while counting."""
    from torch.utils.flop_counter import FlopCounterMode

    from distill.core.graph import split_node

    total = 0.0
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for node in graph.needed_nodes():
            name = split_node(node)[0]
            if node in graph.cached or (models is not None and name not in models):
                continue
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                graph.encode(node, batch)
            total += counter.get_total_flops() * (1 if name in graph.frozen else 3)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return total


def timed(plan: Plan, step: Callable[[], Any]) -> dict[str, Any]:
    """Warm up, then time `plan.steps` steps; the losses they return must be finite."""
    start = time.perf_counter()
    for _ in range(plan.warmup):
        step()
    sync(plan.device)
    warmup_s = time.perf_counter() - start
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outs = [step() for _ in range(plan.steps)]
    sync(plan.device)
    seconds = time.perf_counter() - start
    losses = [o for o in outs if o is not None]
    if losses and not bool(torch.isfinite(torch.stack(losses)).all()):
        raise RuntimeError(f"non-finite loss in the timed steps: {torch.stack(losses).float().cpu().tolist()}")
    return {
        "samples_per_s": plan.steps * plan.batch / seconds, "step_ms": 1e3 * seconds / plan.steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None,
        "warmup_s": warmup_s,
    }  # fmt: skip


def model_phase(plan: Plan, cfg: Config, graph_name: str, compiled: bool) -> dict[str, dict]:
    """Time training steps of one graph (and, for live/eager, the teacher's forward alone)."""
    from distill.training.module import param_groups

    graph, batches = prepare(plan, cfg)
    if graph_name == "cached":
        assert "teacher" not in graph.models, "the cached graph loaded the teacher"
    flops = step_flops(graph, batches[0])  # before compiling: the counter is an eager dispatch mode
    if compiled:
        compile_student(graph, str(plan.compile_backend))
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(graph, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    params = [p for g in opt.param_groups for p in g["params"]]
    cycle: Iterator[Batch] = itertools.cycle(batches)
    clip = cfg.trainer.gradient_clip_val

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(plan):
            loss = graph(next(cycle))["loss"]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss.detach()

    graphs, breaks = dynamo_counts()
    row = {**timed(plan, step), "flops_per_step": flops}
    if compiled:  # what Dynamo captured of the student: few graphs and no breaks is the good case
        after = dynamo_counts()
        reused = " (Dynamo reuses an earlier phase's code: same student)" if after[0] == graphs else ""
        row["note"] = f"{after[0] - graphs} new graphs{reused}, {after[1] - breaks} graph breaks, {plan.compile_backend}"
    rows = {f"{graph_name}/{'compile' if compiled else 'eager'}": row}
    if graph_name == "live" and not compiled:
        teacher = graph.models["teacher"]

        @torch.no_grad()
        def teacher_forward() -> None:  # what the cache removes from a live step
            t = next(cycle).inputs["teacher"]
            with autocast(plan):
                teacher.encode_image(t["pixel_values"].to(next(teacher.parameters()).dtype))
                teacher.encode_text(t["input_ids"], t["attention_mask"])

        rows["teacher_forward"] = {**timed(plan, teacher_forward), "flops_per_step": step_flops(graph, batches[0], {"teacher"}),
                                   "note": "the teacher alone (no_grad): what a cache removes; inside live/eager"}  # fmt: skip
    return rows  # the graph and its batches go with this frame


def fit_phase(plan: Plan, cfg: Config) -> dict[str, Any]:
    """The real path: `fit` on the cached config (Lightning, real loader), its steps timed by a callback."""
    import pytorch_lightning as pl

    from distill.training.fit import fit

    cfg = copy.deepcopy(cfg)
    cfg.trainer.max_steps = plan.warmup + plan.fit_steps
    cfg.trainer.checkpoint_every_n_steps = cfg.trainer.max_steps
    times: dict[str, float] = {}

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == plan.warmup and "start" not in times:
                sync(plan.device)
                if plan.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            sync(plan.device)
            times["end"] = time.perf_counter()

    start = time.perf_counter()
    _, module = fit(cfg, prepare=lambda m: [StepTimer()])
    total = time.perf_counter() - start
    assert "teacher" not in module.graph.models, "fit on the cached config loaded the teacher"
    seconds = times["end"] - times["start"]
    return {
        "samples_per_s": plan.fit_steps * plan.batch / seconds, "step_ms": 1e3 * seconds / plan.fit_steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None,
        "warmup_s": total - seconds,
    }  # fmt: skip


def machine(plan: Plan) -> dict[str, Any]:
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if plan.device == "cuda":
        out["gpu"], out["cuda"] = torch.cuda.get_device_name(), torch.version.cuda
    return out


def summary(rows: dict[str, dict]) -> dict[str, float]:
    """Ratios between phases that ran: cache speed-up, share of the student-only limit, compile gain."""
    sps = {k: v["samples_per_s"] for k, v in rows.items() if v.get("ok") and "samples_per_s" in v}
    out: dict[str, float] = {}
    for mode in ("eager", "compile"):
        live, cached, alone = (sps.get(f"{g}/{mode}") for g in GRAPHS)
        if live and cached:
            out[f"cached_vs_live_{mode}"] = cached / live
        if cached and alone:
            out[f"cached_share_of_student_limit_{mode}"] = cached / alone
    for g in GRAPHS:
        if sps.get(f"{g}/eager") and sps.get(f"{g}/compile"):
            out[f"compile_speedup_{g}"] = sps[f"{g}/compile"] / sps[f"{g}/eager"]
    return out


def table(rows: dict[str, dict]) -> str:
    """The printed table: one line per phase; `wall s` is the whole phase (build, prefetch, warmup, timing)."""
    lines = [f"{'phase':<16}{'samples/s':>10}{'step ms':>9}{'peak GiB':>9}{'TFLOP/s':>9}{'warmup s':>9}{'wall s':>8}  note"]
    for name, r in rows.items():
        wall = f"{r['wall_s']:>8.1f}"
        if not r.get("ok"):
            lines.append(f"{name:<16}{'FAILED':>10}{'':>36}{wall}  {r.get('error', '')[:160]}")
        elif "samples_per_s" not in r:
            lines.append(f"{name:<16}{'':>45}{wall}  {r.get('note', '')}")
        else:
            mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "n/a"
            tf = f"{r['tflops']:.3g}" if r.get("tflops") else ""
            lines.append(f"{name:<16}{r['samples_per_s']:>10.1f}{r['step_ms']:>9.1f}{mem:>9}{tf:>9}"
                         f"{r['warmup_s']:>9.1f}{wall}  {r.get('note', '')}")  # fmt: skip
    return "\n".join(lines)


def run(plan: Plan) -> int:
    """Every phase of the plan in order; returns the exit status (1 when any phase failed)."""
    from distill.data.base import open_dataset
    from distill.training.cache.build import fill_cache

    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; use --tiny for the CPU run", file=sys.stderr)
        return 2
    began = time.perf_counter()
    rows: dict[str, dict] = {}
    result: dict[str, Any] = {"plan": dataclasses.asdict(plan), "phases": rows, "machine": machine(plan)}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cfgs = configs(plan, Path(tmp))
        for phase in plan.phases:
            if phase in rows:  # teacher_forward comes with live/eager
                continue
            print(f"gpu_check: {phase} ...", flush=True)
            start = time.perf_counter()
            try:
                if start - began > plan.budget_s:
                    new = {phase: {"ok": False, "error": f"not started: the {plan.budget_s:.0f} s budget (--budget-s) is spent"}}
                elif phase == "data":
                    open_dataset(cfgs["cached"].data.dataset, cfgs["cached"].data.args).prepare()
                    new = {phase: {"note": f"{plan.images} images at {plan.image_size} px, 5 captions each"}}
                elif phase == "cache":
                    fill_cache(cfgs["cached"], device=plan.device, batch_size=plan.batch)
                    new = {phase: {"note": f"teacher outputs of {plan.images} images + {5 * plan.images} captions"}}
                elif phase == "fit/cached":
                    new = {phase: {**fit_phase(plan, cfgs["cached"]), "note": "Lightning fit, real loader"}}
                else:
                    graph_name, mode = phase.split("/")
                    new = model_phase(plan, cfgs[graph_name], graph_name, mode == "compile")
            except Exception as e:  # noqa: BLE001 - any failure of a phase is recorded; the others still run
                import traceback

                traceback.print_exc()
                new = {phase: {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}}
            wall = time.perf_counter() - start
            for r in new.values():
                r.setdefault("ok", True)
                r.setdefault("wall_s", wall)
                if r.get("flops_per_step"):
                    r["tflops"] = r["flops_per_step"] / (r["step_ms"] / 1e3) / 1e12
            rows.update(new)
            result["summary"] = summary(rows)
            result["ok"] = all(r.get("ok") for r in rows.values())
            result["seconds"] = time.perf_counter() - began
            write_json(Path(plan.out), result)  # after every phase: a killed run keeps what it measured
            gc.collect()
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    print(table(rows))
    for k, v in result["summary"].items():
        print(f"{k}: {v:.3f}")
    failed = [k for k, r in rows.items() if not r.get("ok")]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} phases ok in {result['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {plan.out}")  # fmt: skip
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.plan:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
        return 0
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
