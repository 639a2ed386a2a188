"""Does the fused teacher rank image-text pairs better than the dual teacher? (MCAD's premise)

Usage, from the repository root:
    PYTHONPATH=. python benchmarks/fused_vs_dual.py --dual runs/teacher/towers \
        --fused runs/teacher/fusion [--split test] [--k 16] [--data-root DIR]

On a split of the embedded benchmark: R@1/5/10 both ways of the dual (towers) teacher, and
the same ranking after the fused teacher re-scores each query's top-k dual candidates (the
rest keep the dual order), which is how MCAD uses a cross-encoder: scoring all N x T pairs
is too slow.

Second, MCAD's mixing operator (`fused_kl`, distill/losses/fused.py) measured where it acts:
in training-sized batches (`--batch`, one random caption per image, as the loader draws
them), the modified teacher distribution of each operator and weight is built exactly as
the loss builds it (the same `candidate_mask` and `mixed_targets`, top-`--mix-k`
candidates), and we report how often it ranks the positive first (in-batch R@1, both ways)
and the mean probability it puts on the positive. Writes
benchmarks/results/fused_vs_dual_<split>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config.schema import DataConfig
from distill.losses.fused import candidate_mask, mixed_targets
from distill.models.dual_encoder import Towers
from distill.models.fusion import Fusion
from distill.training.datamodule import DistillDataModule

KS = (1, 5, 10)
TAU = 0.05
RERANKS = {"fused alone": None, "dual/tau + 0.5 fused": 0.5, "dual/tau + 1 fused": 1.0, "dual/tau + 2 fused": 2.0}
RESULTS = Path(__file__).parent / "results"


def recalls(scores: Tensor, image_ids: Tensor, text_image_ids: Tensor) -> dict[str, float]:
    """R@K both ways from an (N images, T captions) score matrix; ties count for the query."""
    pos = image_ids[:, None] == text_image_ids[None, :]
    best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    i2t_rank = (scores.masked_fill(pos, float("-inf")) > best).sum(1)
    own = scores[pos.float().argmax(0), torch.arange(scores.shape[1])]
    t2i_rank = (scores.masked_fill(pos, float("-inf")) > own[None, :]).sum(0)
    out = {f"i2t_r{k}": 100.0 * (i2t_rank < k).float().mean().item() for k in KS}
    out.update({f"t2i_r{k}": 100.0 * (t2i_rank < k).float().mean().item() for k in KS})
    out["rsum"] = sum(out.values())
    return out


def rerank(scores: Tensor, k: int, score_pairs, weights: tuple[float | None, ...]) -> list[Tensor]:  # noqa: ANN001
    """`scores` with each row's top-k entries re-scored and placed above the rest: by the fused
    logit alone (weight None) or by `scores / tau + w * fused logit` (w, tau = --tau)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    rows = torch.arange(scores.shape[0])[:, None].expand_as(top)
    fused = score_pairs(rows.flatten(), top.flatten()).view_as(top)
    outs = []
    for w in weights:
        out = scores.clone()
        out[rows, top] = 1e4 + (fused if w is None else scores[rows, top] / TAU + w * fused)
        outs.append(out)
    return outs


MIXES = (("dual only", "prob", 0.0), ("prob", "prob", 0.25), ("prob", "prob", 0.5), ("prob", "prob", 0.75),
         ("prob", "prob", 1.0), ("logit", "logit", 0.5), ("logit", "logit", 1.0), ("logit", "logit", 2.0))


def mixing_table(d: dict[str, Tensor], score_pairs, *, batch: int, k: int, batches: int, tau: float,  # noqa: ANN001
                 tau_f: float, seed: int = 0) -> list[dict[str, float]]:
    """In-batch R@1 and positive mass of each operator's target, averaged over both directions."""
    g = torch.Generator().manual_seed(seed)
    n = len(d["ids"])
    caption_of = [torch.nonzero(d["tids"] == d["ids"][i]).flatten() for i in range(n)]
    sums = {m: [0.0, 0.0] for m in MIXES}
    for _ in range(batches):
        rows = torch.randperm(n, generator=g)[:batch]
        cols = torch.stack([c[torch.randint(len(c), (1,), generator=g)] for c in (caption_of[int(r)] for r in rows)])
        cols = cols.flatten()
        ids = d["ids"][rows]
        t = d["img"][rows].float() @ d["txt"][cols].float().t() / tau
        cand_r, cand_c = candidate_mask(t, ids, k), candidate_mask(t.t(), ids, k).t()
        union = cand_r | cand_c
        ii, jj = union.nonzero(as_tuple=True)
        fused = torch.full(t.shape, float("-inf"))
        fused[ii, jj] = score_pairs(rows[ii], cols[jj])
        pos = ids[:, None] == ids[None, :]
        for m in MIXES:
            _, mix, alpha = m
            for logits, f, c, p in ((t, fused, cand_r, pos), (t.t(), fused.t(), cand_c.t(), pos.t())):
                target = mixed_targets(logits, f.masked_fill(~c, float("-inf")), c, mix=mix, alpha=alpha,
                                       fused_temperature=tau_f)
                sums[m][0] += p.gather(1, target.argmax(1, keepdim=True)).float().mean().item() / 2
                sums[m][1] += (target * p).sum(1).mean().item() / 2
    return [{"operator": m[0], "mix": m[1], "alpha": m[2], "r1": 100 * sums[m][0] / batches,
             "positive_mass": sums[m][1] / batches} for m in MIXES]


def collect(dual: Towers, fused: Fusion, data: DistillDataModule, split: str) -> dict[str, Tensor]:
    """Dual embeddings plus the fused model's pixels and (re-padded) tokens for a whole split."""
    parts: dict[str, list[Tensor]] = {k: [] for k in ("img", "txt", "ids", "tids", "px", "tok", "mask")}
    with torch.no_grad():
        for b in data.eval_dataloader(split):
            parts["img"].append(dual.encode_image(b.image_inputs["dual"]["pixel_values"]))
            t = b.text_inputs["dual"]
            parts["txt"].append(dual.encode_text(t["input_ids"], t["attention_mask"]))
            parts["ids"].append(b.image_ids)
            parts["tids"].append(b.text_image_ids)
            parts["px"].append(b.image_inputs["fused"]["pixel_values"])
            parts["tok"].append(b.text_inputs["fused"]["input_ids"])
            parts["mask"].append(b.text_inputs["fused"]["attention_mask"])
    length = max(x.shape[1] for x in parts["tok"])
    pad = lambda xs: torch.cat([F.pad(x, (0, length - x.shape[1])) for x in xs])  # noqa: E731
    return {"img": torch.cat(parts["img"]), "txt": torch.cat(parts["txt"]), "ids": torch.cat(parts["ids"]),
            "tids": torch.cat(parts["tids"]), "px": torch.cat(parts["px"]), "tok": pad(parts["tok"]),
            "mask": pad(parts["mask"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dual", default="runs/teacher/towers")
    ap.add_argument("--fused", default="runs/teacher/fusion")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=16, help="dual candidates re-scored per query")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="training batch size for the mixing table")
    ap.add_argument("--batches", type=int, default=40, help="batches drawn for the mixing table")
    ap.add_argument("--mix-k", type=int, default=3, help="fused_kl's k for the mixing table")
    ap.add_argument("--tau", type=float, default=TAU, help="dual teacher temperature in fused_kl")
    ap.add_argument("--skip-rerank", action="store_true", help="only the mixing table")
    ap.add_argument("--tau-f", type=float, default=1.0, help="fused temperature in fused_kl")
    args = ap.parse_args()
    dual, fused = Towers(path=args.dual).eval(), Fusion(path=args.fused).eval()
    cfg = DataConfig(args={"root": args.data_root} if args.data_root else {}, num_workers=0)
    pre = {"dual": (dual.image_preprocess(), dual.text_preprocess()),
           "fused": (fused.image_preprocess(), fused.text_preprocess())}
    data = DistillDataModule(cfg, pre, pre)
    data.check()
    d = collect(dual, fused, data, args.split)

    def score_pairs(i: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([fused.pair_forward(d["px"][i[s:s + args.chunk]], d["tok"][t[s:s + args.chunk]],
                                                 d["mask"][t[s:s + args.chunk]])[0]
                              for s in range(0, len(i), args.chunk)])

    sim = d["img"].float() @ d["txt"].float().t()
    dual_r = recalls(sim, d["ids"], d["tids"])
    reranked: dict[str, dict[str, float]] = {}
    seconds = 0.0
    if not args.skip_rerank:
        start = time.perf_counter()
        i2t = rerank(sim, args.k, score_pairs, tuple(RERANKS.values()))                       # rows: images
        t2i = rerank(sim.t(), args.k, lambda t, i: score_pairs(i, t), tuple(RERANKS.values()))  # rows: captions
        seconds = time.perf_counter() - start
        for name, a, b in zip(RERANKS, i2t, t2i):
            r_i2t, r_t2i = recalls(a, d["ids"], d["tids"]), recalls(b.t(), d["ids"], d["tids"])
            r = {**{k: v for k, v in r_i2t.items() if k.startswith("i2t")},
                 **{k: v for k, v in r_t2i.items() if k.startswith("t2i")}}
            r["rsum"] = sum(r.values())
            reranked[name] = r
    print(f"{args.split}: {len(d['ids'])} images, {len(d['tids'])} captions; fused re-scores top-{args.k}")
    print(f"{'':<24}" + "".join(f"{k:>9}" for k in dual_r))
    for name, r in (("dual teacher", dual_r), *reranked.items()):
        print(f"{name:<24}" + "".join(f"{v:9.2f}" for v in r.values()))
    if reranked:
        print(f"fused scoring: {seconds:.1f} s for {(len(d['ids']) + len(d['tids'])) * args.k} pairs")
    mixing = mixing_table(d, score_pairs, batch=args.batch, k=args.mix_k, batches=args.batches, tau=args.tau,
                          tau_f=args.tau_f)
    print(f"\nfused_kl targets in batches of {args.batch} (k = {args.mix_k}, {args.batches} batches, both ways)")
    print(f"{'operator':<10}{'alpha':>7}{'in-batch R@1':>14}{'positive mass':>15}")
    for r in mixing:
        print(f"{r['operator']:<10}{r['alpha']:7.2f}{r['r1']:14.2f}{r['positive_mass']:15.3f}")
    out = RESULTS / f"fused_vs_dual_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"split": args.split, "k": args.k, "dual": args.dual, "fused": args.fused,
                                   "dual_teacher": dual_r, "reranked_top_k": reranked, "fused_seconds": seconds,
                                   "mixing": {"batch": args.batch, "k": args.mix_k, "batches": args.batches,
                                              "tau": args.tau, "tau_f": args.tau_f, "rows": mixing}},
                                  indent=2))


if __name__ == "__main__":
    main()
