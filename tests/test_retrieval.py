"""Retrieval recall: against a brute-force reference, hand-made cases, and under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import RetrievalBatch
from distill.eval.retrieval import RetrievalRecall, encode_loader, retrieval_metrics
from distill.models.base import Encoder, l2norm

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def brute_force(
    img: Tensor, img_ids: Tensor, txt: Tensor, txt_img_ids: Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Reference: full float64 similarity matrix, a full argsort and explicit loops."""
    sim = img.double() @ txt.double().T
    i2t_hits = {k: 0 for k in ks}
    for i in range(img.shape[0]):
        order = torch.argsort(sim[i], descending=True).tolist()
        positives = {t for t in range(txt.shape[0]) if txt_img_ids[t] == img_ids[i]}
        first = min(pos for pos, t in enumerate(order) if t in positives)
        for k in ks:
            i2t_hits[k] += first < k
    t2i_hits = {k: 0 for k in ks}
    for t in range(txt.shape[0]):
        order = torch.argsort(sim[:, t], descending=True).tolist()
        first = next(pos for pos, i in enumerate(order) if img_ids[i] == txt_img_ids[t])
        for k in ks:
            t2i_hits[k] += first < k
    out = {f"i2t_r{k}": 100.0 * i2t_hits[k] / img.shape[0] for k in ks}
    out |= {f"t2i_r{k}": 100.0 * t2i_hits[k] / txt.shape[0] for k in ks}
    out["rsum"] = sum(out.values())
    return out


def make_set(
    n: int, dim: int, noise: float, seed: int, caps: int = 5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images with non-contiguous ids and `caps` noisy, shuffled captions each."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    ids = torch.randperm(10 * n, generator=g)[:n] + 1000
    owner = torch.arange(n).repeat_interleave(caps)
    owner = owner[torch.randperm(owner.numel(), generator=g)]
    txt = F.normalize(img[owner] + noise * torch.randn(owner.numel(), dim, generator=g), dim=1)
    return img, ids, txt, ids[owner]


def assert_close(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


@pytest.mark.parametrize("n,dim,noise", [(10, 8, 0.5), (37, 16, 1.0), (64, 4, 0.7)])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_matches_brute_force(n: int, dim: int, noise: float, chunk_size: int) -> None:
    data = make_set(n, dim, noise, seed=n + chunk_size)
    ours = retrieval_metrics(*data, chunk_size=chunk_size)
    assert_close(ours, brute_force(*data))
    assert set(ours) == {*KEYS, "rsum"}
    assert 0 < ours["rsum"] < 600  # a non-trivial case


def test_matches_brute_force_with_uneven_captions_and_ks() -> None:
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    ids = torch.arange(20) * 3
    owner = torch.cat([torch.arange(20), torch.randint(0, 20, (40,), generator=g)])
    txt = F.normalize(img[owner] + 0.8 * torch.randn(60, 8, generator=g), dim=1)
    ours = retrieval_metrics(img, ids, txt, ids[owner], chunk_size=6, ks=(1, 2, 3, 25))
    assert_close(ours, brute_force(img, ids, txt, ids[owner], ks=(1, 2, 3, 25)))
    assert ours["t2i_r25"] == 100.0  # K above N


def test_perfect_embeddings_give_100() -> None:
    img = torch.eye(4)
    owner = torch.arange(4).repeat(5)
    ours = retrieval_metrics(img, torch.arange(4), img[owner], owner)
    assert all(ours[k] == 100.0 for k in KEYS)
    assert ours["rsum"] == 600.0


def test_constructed_half_recall() -> None:
    # Image B scores A's caption (0.8) above its own (0.6): i2t R@1 = 50 %, everything else 100.
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ours = retrieval_metrics(img, torch.tensor([0, 1]), txt, torch.tensor([0, 1]))
    assert ours == {
        "i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "t2i_r1": 100.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "rsum": 550.0,
    }  # fmt: skip


def test_ties_count_in_favour_of_the_query() -> None:
    # Two identical images: each caption's own image ties with the other one -> still R@1.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ours = retrieval_metrics(img, torch.tensor([0, 1]), txt, torch.tensor([0, 1]))
    assert ours["i2t_r1"] == ours["t2i_r1"] == 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_scored_in_float32(dtype: torch.dtype) -> None:
    img, ids, txt, tids = make_set(30, 16, 0.8, seed=7)
    img, txt = img.to(dtype), txt.to(dtype)
    ours = retrieval_metrics(img, ids, txt, tids, chunk_size=8)
    assert_close(ours, brute_force(img.float(), ids, txt.float(), tids))


def test_bad_inputs_raise_clear_errors() -> None:
    img, ids, txt, tids = make_set(6, 4, 0.5, seed=1)
    with pytest.raises(ValueError, match="not in image_ids"):
        retrieval_metrics(img[1:], ids[1:], txt, tids)
    with pytest.raises(ValueError, match="unique"):
        retrieval_metrics(torch.cat([img, img[:1]]), torch.cat([ids, ids[:1]]), txt, tids)
    with pytest.raises(ValueError, match="no caption"):
        keep = tids != ids[0]
        retrieval_metrics(img, ids, txt[keep], tids[keep])
    with pytest.raises(ValueError, match="text_emb"):
        retrieval_metrics(img, ids, txt[:, :2], tids)
    with pytest.raises(ValueError, match="ids"):
        retrieval_metrics(img, ids[:3], txt, tids)


# ---- the Metric under (simulated and real) DDP ------------------------------------------


def shard(rank: int, world: int, n: int) -> list[int]:
    """DistributedSampler(shuffle=False) indices: padded with repeats from the start."""
    indices = list(range(n))
    total = -(-n // world) * world
    indices += indices[: total - n]
    return indices[rank:total:world]


def feed(metric: RetrievalRecall, data: tuple, indices: list[int], with_text_ids: bool) -> None:
    """Update with batches of 2 images and all their captions, as a retrieval loader would."""
    img, ids, txt, tids = data
    for b in range(0, len(indices), 2):
        rows = torch.tensor(indices[b : b + 2])
        caps = torch.cat([torch.nonzero(tids == ids[r]).flatten() for r in rows])
        metric.update(img[rows], ids[rows], txt[caps], tids[caps], caps if with_text_ids else None)


@pytest.mark.parametrize("with_text_ids", [False, True])
def test_metric_merged_ranks_equal_single_process(with_text_ids: bool) -> None:
    data = make_set(11, 8, 0.8, seed=11)
    ranks = [RetrievalRecall(chunk_size=4) for _ in range(2)]
    for rank, metric in enumerate(ranks):
        feed(metric, data, shard(rank, 2, 11), with_text_ids)
    assert 0 in shard(1, 2, 11)  # rank 1 carries a padded duplicate of image 0
    ranks[0].merge_state(ranks[1])
    assert_close(ranks[0].compute(), retrieval_metrics(*data))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="before any update"):
        RetrievalRecall().compute()
    img, ids, txt, tids = make_set(4, 4, 0.5, seed=2)
    metric = RetrievalRecall()
    with pytest.raises(ValueError, match="text_ids"):
        metric.update(img[[0, 0]], ids[[0, 0]], txt, tids)
    metric.update(img[:2], ids[:2], txt, tids)  # captions of images 2, 3 without the images
    with pytest.raises(ValueError, match="not in image_ids"):
        metric.compute()
    metric.update(img[2:], ids[2:], txt[:1], tids[:1], text_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="every update"):
        metric.compute()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        metric = RetrievalRecall(chunk_size=4)
        feed(metric, make_set(11, 8, 0.8, seed=11), shard(rank, world, 11), False)
        result = metric.compute()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_metric_two_process_gloo(tmp_path: Path) -> None:
    # fork, not spawn: the children inherit the imported modules (importing torchmetrics
    # alone takes seconds), which keeps this test around a second.
    torch.multiprocessing.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    expected = retrieval_metrics(*make_set(11, 8, 0.8, seed=11))
    local = RetrievalRecall(chunk_size=4)
    feed(local, make_set(11, 8, 0.8, seed=11), shard(0, 2, 11), False)
    assert local.compute() != expected  # so equality below proves the states were gathered
    for rank in range(2):
        assert_close(json.loads((tmp_path / f"rank{rank}.json").read_text()), expected)


# ---- encode_loader ---------------------------------------------------------------------


class TinyEncoder(Encoder):
    """Linear image encoder and mean-of-embeddings text encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(3 * 4 * 4, 6)
        self.text = nn.Embedding(20, 6)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return l2norm(self.image(pixel_values.flatten(1)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return l2norm((self.text(input_ids) * mask).sum(1) / mask.sum(1))


def make_batch(first_id: int, g: torch.Generator) -> RetrievalBatch:
    ids = torch.tensor([first_id, first_id + 1])
    text = {
        "input_ids": torch.randint(0, 20, (4, 5), generator=g),
        "attention_mask": torch.ones(4, 5, dtype=torch.long),
    }
    return RetrievalBatch(
        image_ids=ids,
        text_image_ids=ids.repeat_interleave(2),
        image_inputs={"student": {"pixel_values": torch.randn(2, 3, 4, 4, generator=g)}},
        text_inputs={"student": text},
    )


def test_encode_loader() -> None:
    g = torch.Generator().manual_seed(0)
    encoder = TinyEncoder().train()
    batches = [make_batch(0, g), make_batch(2, g)]
    image_emb, image_ids, text_emb, text_image_ids = encode_loader(encoder, batches, "student")
    assert encoder.training
    assert image_emb.shape == (4, 6) and text_emb.shape == (8, 6)
    assert image_ids.tolist() == [0, 1, 2, 3]
    assert text_image_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = encoder.encode_image(batches[1].image_inputs["student"]["pixel_values"])
    torch.testing.assert_close(image_emb[2:], expected)
    assert retrieval_metrics(image_emb, image_ids, text_emb, text_image_ids)["rsum"] >= 0
    with pytest.raises(KeyError, match="teacher"):
        encode_loader(encoder, batches, "teacher")
