"""What the graph costs: the ConaCLIP step through `KnowledgeGraph` vs the same losses written by hand.

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/graph_overhead.py [--repeats 40] [--batch 32] [--threads 1]

The edges of experiments/conaclip.yaml (8 enabled: InfoNCE task, 4 teacher-student InfoNCE,
3 similarity KL) on small models, so that plumbing is not hidden behind big matrix products:
student = test_resnet at 32 px + 2-layer 64-wide BERT, teacher (frozen) = resnet10t at 32 px
+ 2-layer 128-wide BERT. One step = zero_grad, forward, backward. The hand-written step calls
the same model and loss objects directly: four encoder calls, eight loss calls, one sum. Both
give the same loss (checked). Steps alternate between the two, `--repeats` each, on one real
batch of the embedded data; reported are medians and the median of per-pair ratios.
Writes benchmarks/results/graph_overhead.json.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, bert, experiment, interleaved, median, write
from torch import Tensor

from distill.batch import Batch
from distill.core.build import build_graph
from distill.core.graph import KnowledgeGraph
from distill.losses import EdgeContext
from distill.training.module import DistillModule
from distill.training.trainer import make_datamodule

STUDENT = {"type": "dual_encoder", "args": {"image_model": "test_resnet", "image_size": 32, "text_config": bert(64, 2),
                                            "embed_dim": 64, "pooling": "mean", "max_length": 40}}  # fmt: skip
TEACHER = {"type": "dual_encoder", "frozen": True, "args": {"image_model": "resnet10t", "image_size": 32,
           "text_config": bert(128, 2), "embed_dim": 128, "pooling": "mean", "max_length": 40}}  # fmt: skip


def hand_written(graph: KnowledgeGraph) -> Callable[[Batch], Tensor]:
    """The ConaCLIP loss of `experiments/conaclip.yaml`, written out without the graph."""
    student, teacher, L = graph.models["student"], graph.models["teacher"], graph.losses

    def loss(batch: Batch) -> Tensor:
        s, t = batch.inputs["student"], batch.inputs["teacher"]
        si = student.encode_image(s["pixel_values"])
        st = student.encode_text(s["input_ids"], s["attention_mask"])
        with torch.no_grad():
            ti = teacher.encode_image(t["pixel_values"]).float()
            tt = teacher.encode_text(t["input_ids"], t["attention_mask"]).float()
        ctx = EdgeContext(image_ids=batch.image_ids, keys=batch.keys)
        return (
            L["si_st"](si, st, ctx=ctx) + L["ti_si"](si, ti, ctx=ctx) + L["tt_st"](st, tt, ctx=ctx)
            + L["tt_si"](si, tt, ctx=ctx) + L["ti_st"](st, ti, ctx=ctx)
            + L["si_si"](si, si, ti, ti, ctx=ctx) + L["st_st"](st, st, tt, tt, ctx=ctx)
            + L["si_st_kl"](si, st, ti, tt, ctx=ctx)
        )

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "graph_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"data.args={{n_train: 64, n_val: 0, n_test: 0, root: '{tmp}'}}"
        cfg = experiment("conaclip", {"student": STUDENT, "teacher": TEACHER},
                         [data, f"data.batch_size={args.batch}", "data.num_workers=0", f"output_dir={tmp}"])  # fmt: skip
        torch.manual_seed(0)
        graph = build_graph(cfg)
        assert [e.name for e in graph.enabled_edges()] == ["si_st", "ti_si", "tt_st", "tt_si", "ti_st", "si_si", "st_st", "si_st_kl"]
        assert all(e.weight == 1.0 for e in graph.enabled_edges())
        batch = next(iter(make_datamodule(cfg, DistillModule(cfg, graph=graph)).train_dataloader()))
    hand = hand_written(graph)
    graph.eval()  # no dropout: both must give the very same loss
    same = torch.allclose(graph(batch)["loss"], hand(batch), rtol=1e-6, atol=1e-6)
    graph.train()

    def step(fn: Callable[[], Tensor]) -> None:
        graph.zero_grad(set_to_none=True)
        fn().backward()

    times = interleaved({"graph": lambda: step(lambda: graph(batch)["loss"]), "hand": lambda: step(lambda: hand(batch))},
                        args.repeats, warmup=3)  # fmt: skip
    ratios = sorted(g / h for g, h in zip(times["graph"], times["hand"]))
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median_ms": {k: 1e3 * median(v) for k, v in times.items()},
        "times_ms": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
        "ratio_of_medians": median(times["graph"]) / median(times["hand"]),
        "median_pair_ratio": median(ratios),
        "same_loss": same,
    }
    result["target_le_1.05x"] = result["ratio_of_medians"] <= 1.05
    print(f"{'step (fwd+bwd)':<28}{'median ms':>10}")
    for name, ms in result["median_ms"].items():
        print(f"{name:<28}{ms:>10.2f}")
    print(f"graph / hand: {result['ratio_of_medians']:.3f}x (ratio of medians), "
          f"{result['median_pair_ratio']:.3f}x (median of {args.repeats} paired ratios); same loss: {same}")  # fmt: skip
    write(result, args.out)


if __name__ == "__main__":
    main()
