"""Hard-negative mining (`distill index mine`) and the `hard_negative` loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.commands.cli import main
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.losses.base import EdgeContext
from distill.negatives.mine import mine_index
from distill.negatives.store import load_negatives
from distill.registry import LOSSES
from distill.training.stages import train
from distill.training.trainer import metrics_csv

HN_EDGE = """
  hn:
    loss: hard_negative
    inputs: [student.image, student.text]
    args: {{index: '{index}', k: 3, temperature: 0.1, direction: i2t{extra}}}
"""


def with_hn_edge(tiny_yaml: Path, index: Path, extra: str = "") -> Path:
    text = tiny_yaml.read_text().replace("\ndata:", HN_EDGE.format(index=index, extra=extra).rstrip() + "\ndata:", 1)
    tiny_yaml.write_text(text)
    return tiny_yaml


@pytest.fixture
def index_file(tiny_yaml: Path, tmp_path: Path) -> Path:
    out = tmp_path / "hn.pt"
    assert main(["index", "mine", str(tiny_yaml), "--model", "student", "--output", str(out), "--k", "6"]) == 0
    return out


def test_index_holds_every_training_sample(index_file: Path, tiny_yaml: Path) -> None:
    from distill.data.base import open_dataset

    index = load_negatives(index_file)
    cfg = load_checked(tiny_yaml)
    keys = [s[0] for s in open_dataset(cfg.data.dataset, cfg.data.args).train_samples()]
    assert sorted(index["keys"]) == sorted(keys) and len(set(index["keys"])) == len(keys)
    n, d = index["text"].shape
    assert index["image"].shape == (n, d) and index["i2t"].shape == (n, 6) and index["t2i"].shape == (n, 6)
    assert index["model"] == "student" and index["k"] == 6
    # every caption of an image carries that image's embedding
    ids = index["image_ids"]
    for i in range(n):
        first = int((ids == ids[i]).nonzero()[0])
        assert torch.equal(index["image"][i], index["image"][first])


def test_mined_negatives_are_the_true_top_k(index_file: Path) -> None:
    index = load_negatives(index_file)
    ids, image, text, k = index["image_ids"], index["image"], index["text"], index["k"]
    first_of = {}
    for i, image_id in enumerate(ids.tolist()):
        first_of.setdefault(image_id, i)
    reps = torch.tensor(sorted(first_of.values()))
    for i in range(len(ids)):
        # image -> text: all captions of other images, brute force
        scores = image[i] @ text.t()
        scores[ids == ids[i]] = -math.inf
        assert index["i2t"][i].tolist() == scores.topk(k).indices.tolist()
        # text -> image: one row per other image
        scores = text[i] @ image[reps].t()
        scores[ids[reps] == ids[i]] = -math.inf
        assert index["t2i"][i].tolist() == reps[scores.topk(k).indices].tolist()
    assert not (ids[index["i2t"]] == ids[:, None]).any()
    assert not (ids[index["t2i"]] == ids[:, None]).any()
    assert all(len(set(row)) == k for row in ids[index["t2i"]].tolist())  # distinct images


def synthetic_index(n_images: int = 5, captions: int = 2, dim: int = 4, k: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(n_images).repeat_interleave(captions)
    image = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)[ids]
    text = F.normalize(torch.randn(len(ids), dim, generator=gen), dim=-1)
    keys = [f"{i}/{c}" for i in range(n_images) for c in range(captions)]
    return mine_index({"keys": keys, "image_ids": ids, "image": image, "text": text}, k, "m")


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_loss_matches_the_formula(direction: str) -> None:
    index = synthetic_index()
    tau, k = 0.1, 2
    loss = LOSSES.get("hard_negative")(index="unused.pt", k=k, temperature=tau, direction=direction)
    loss.set_negatives(index)
    rows = [0, 1, 4, 7]  # image 0 twice (a positive pair in the batch), images 2 and 3
    keys = [index["keys"][r] for r in rows]
    ids = index["image_ids"][rows]
    gen = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 4, generator=gen), dim=-1).requires_grad_(True)
    p = F.normalize(torch.randn(4, 4, generator=gen), dim=-1)
    got = loss(q, p, ctx=EdgeContext(image_ids=ids, keys=keys))
    bank = index["text"] if direction == "i2t" else index["image"]
    expected = 0.0
    for i, r in enumerate(rows):
        negatives = [bank[j] for j in index[direction][r][:k].tolist()]
        qi = q[i].detach()
        logits = [float(qi @ p[j]) / tau for j in range(4)] + [float(qi @ n) / tau for n in negatives]
        log_z = math.log(sum(math.exp(x) for x in logits))
        positives = [j for j in range(4) if ids[j] == ids[i]]
        expected += -sum(logits[j] - log_z for j in positives) / len(positives)
    assert got.item() == pytest.approx(expected / 4, rel=1e-5)
    got.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_loss_rejects_bad_args_and_unknown_keys() -> None:
    cls = LOSSES.get("hard_negative")
    with pytest.raises(ValueError, match="direction"):
        cls(index="x.pt", direction="both")
    loss = cls(index="x.pt", k=5)
    with pytest.raises(ValueError, match="k=5 but the index"):
        loss.set_negatives(synthetic_index(k=3))
    loss = cls(index="x.pt", k=2)
    loss.set_negatives(synthetic_index())
    with pytest.raises(KeyError, match="not in the index"):
        loss(torch.ones(1, 4), torch.ones(1, 4), ctx=EdgeContext(image_ids=torch.tensor([0]), keys=["nope/0"]))


def test_missing_index_is_a_clear_error_at_fit_time(tiny_yaml: Path, tmp_path: Path) -> None:
    path = with_hn_edge(tiny_yaml, tmp_path / "missing.pt")
    cfg = load_checked(path)  # validation does not need the file
    with pytest.raises(ConfigError, match=r"^edges\.hn\.args\.index: negatives file '.*missing.pt': no such file"):
        train(cfg)


def test_fit_with_hard_negatives_and_refresh(tiny_yaml: Path, index_file: Path) -> None:
    path = with_hn_edge(tiny_yaml, index_file, ", refresh_every: 2")
    before = load_negatives(index_file)
    metrics, module = train(load_checked(path))
    assert "val/rsum" in metrics
    after = load_negatives(index_file)
    assert not torch.equal(before["image"], after["image"])  # re-embedded with trained weights
    assert after["i2t"].shape == before["i2t"].shape
    assert "train/edge/hn" in open(metrics_csv(load_checked(path).output_dir)).readline()
