"""Fused (single-stream) teachers: the pair node, ITM training, save/load, the BLIP adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.losses.base import EdgeContext
from distill.losses.itm import itm_loss, sample_negatives
from distill.models._hf import DEFAULT_TOKENIZER
from distill.models.blip import BlipITM
from distill.models.fusion import Fusion, PairScorer
from distill.registry import LOSSES
from tests.conftest import TINY_FUSION, shrink


def batch_inputs(model: Fusion | BlipITM, n: int = 4) -> dict[str, torch.Tensor]:
    size = model.image_preprocess().size
    captions = ["a red circle", "two blue squares left of a green star", "a star", "three small yellow triangles"]
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), **model.text_preprocess()(captions[:n])}


@pytest.fixture
def fusion() -> Fusion:
    torch.manual_seed(0)
    return Fusion(**TINY_FUSION).eval()  # type: ignore[arg-type]


def test_pair_scorer_shapes_and_k_pairs_equal_one_by_one(fusion: Fusion) -> None:
    scorer = fusion.encode("pair", batch_inputs(fusion))
    assert isinstance(scorer, PairScorer) and (scorer.n_images, scorer.n_texts) == (4, 4)
    i, t = torch.tensor([0, 1, 3, 2, 0, 3]), torch.tensor([0, 2, 1, 2, 3, 3])
    with torch.no_grad():
        scores, feats = scorer(i, t)
        assert scores.shape == (6,) and feats.shape == (6, TINY_FUSION["width"])
        torch.testing.assert_close(scorer.scores(i, t), scores)
        torch.testing.assert_close(scorer.features(i, t), feats)
        singles = [scorer(i[k:k + 1], t[k:k + 1]) for k in range(6)]
    torch.testing.assert_close(torch.cat([s for s, _ in singles]), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([f for _, f in singles]), feats, atol=1e-5, rtol=1e-5)
    chunked = PairScorer(scorer.run, n_images=4, n_texts=4, grad=False, chunk_size=4)
    torch.testing.assert_close(chunked.scores(i, t), scores, atol=1e-5, rtol=1e-5)
    assert scorer.matrix().shape == (4, 4)
    torch.testing.assert_close(scorer.matrix()[i, t], scores.detach(), atol=1e-5, rtol=1e-5)


def test_fusion_unimodal_outputs(fusion: Fusion) -> None:
    assert Fusion.describe(**TINY_FUSION) == {"pair": 32, "image": 32, "text": 32}
    inputs = batch_inputs(fusion)
    image, text = fusion.encode("image", inputs), fusion.encode("text", inputs)
    assert image.shape == text.shape == (4, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))


def test_frozen_scorer_runs_without_grad_and_trainable_with(fusion: Fusion) -> None:
    inputs = batch_inputs(fusion)
    trainable = fusion.encode("pair", inputs).scores(torch.arange(4), torch.arange(4))
    assert trainable.requires_grad
    fusion.requires_grad_(False)
    frozen = fusion.encode("pair", inputs).scores(torch.arange(4), torch.arange(4))
    assert not frozen.requires_grad


def test_fusion_save_load_round_trip(tmp_path: Path, fusion: Fusion) -> None:
    folder = fusion.save_pretrained(tmp_path / "fused")
    assert {p.name for p in folder.iterdir()} == {"fusion.json", "model.safetensors", "tokenizer"}
    assert Fusion.describe(path=str(folder)) == {"pair": 32, "image": 32, "text": 32}
    loaded = Fusion(path=str(folder)).eval()
    for key, value in fusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs, i = batch_inputs(fusion), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode("pair", inputs).scores(i, i.flip(0)),
                                   fusion.encode("pair", inputs).scores(i, i.flip(0)))


def test_fusion_path_errors(tmp_path: Path, tiny_towers: Path) -> None:
    with pytest.raises(ConfigError, match="fusion folder '/no/such/fusion' does not exist"):
        Fusion.describe(path="/no/such/fusion")
    with pytest.raises(ConfigError, match=f"'{tiny_towers}' is not a fusion folder"):
        Fusion.describe(path=str(tiny_towers))
    with pytest.raises(ConfigError, match="drop depth, width"):
        Fusion.describe(path=str(tiny_towers), width=64, depth=2)
    with pytest.raises(ConfigError, match="width 30 is not a multiple of heads 4"):
        Fusion.describe(width=30)


def test_sample_negatives_never_picks_a_positive() -> None:
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    for seed in range(20):
        torch.manual_seed(seed)
        neg = sample_negatives(torch.rand(6, 6), ids)
        assert (ids[neg] != ids).all()
    assert sample_negatives(torch.ones(2, 2), torch.tensor([5, 5])).tolist() == [-1, -1]
    peaked = torch.full((3, 3), 1e-9)
    peaked[0, 2] = peaked[1, 0] = peaked[2, 1] = 1.0  # a hard negative dominates each row
    assert sample_negatives(peaked, torch.arange(3)).tolist() == [2, 0, 1]


class FixedScorer(PairScorer):
    """Scores from a fixed matrix, to check the loss value independently of any model."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(lambda i, t: (logits[i, t], logits[i, t, None]), n_images=len(logits),
                         n_texts=len(logits), grad=True)


def test_itm_loss_value() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 0.9]])
    got = itm_loss(FixedScorer(logits), torch.tensor([2, 0, -1]), torch.tensor([1, -1, 0])).item()
    bce = lambda x, y: -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))  # noqa: E731
    # positives (0,0) (1,1) (2,2); negative captions (0,2) (1,0); negative images (1,0) (0,2)
    terms = [bce(2.0, 1), bce(1.5, 1), bce(0.9, 1), bce(0.5, 0), bce(0.3, 0), bce(0.3, 0), bce(0.5, 0)]
    assert math.isclose(got, sum(terms) / len(terms), rel_tol=1e-6)


@pytest.mark.parametrize("name", ["itm", "itm_hard"])
def test_itm_losses_train_the_fused_model(name: str, fusion: Fusion) -> None:
    fusion.train()
    loss = LOSSES.get(name)()
    ctx = EdgeContext(image_ids=torch.tensor([0, 0, 1, 2]))
    scorer = fusion.encode("pair", batch_inputs(fusion))
    dual = [torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(2)]
    out = loss(scorer, *dual, ctx=ctx) if name == "itm_hard" else loss(scorer, ctx=ctx)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert fusion.itm_head.weight.grad is not None and fusion.backbone.blocks[0].q.weight.grad is not None
    assert LOSSES.get(name).global_batch is False and LOSSES.get(name).inputs[0] == "pair"


def test_fused_pretrain_graph_step_then_as_frozen_teacher(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    exp = Path(__file__).parent.parent / "experiments" / "fused_teacher_pretrain.yaml"
    graph = build_graph(load_checked(exp, shrink(exp, data_root, tmp_path, tiny_towers)))
    from tests.test_graph import fake_batch

    out = graph(fake_batch(graph))
    out["loss"].backward()
    assert set(out) == {"loss", "edge/itc", "edge/itm", "edge/itm_random"} and torch.isfinite(out["loss"])
    assert graph.models["fused"].itm_head.weight.grad is not None
    graph.models["fused"].requires_grad_(False)  # as a frozen teacher: nothing builds a graph
    graph.frozen.add("fused")
    scorer = graph.encode("fused.pair", fake_batch(graph))
    assert not scorer.scores(torch.arange(3), torch.arange(3)).requires_grad


def save_tiny_blip(folder: Path) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
    )

    tok = BertTokenizerFast.from_pretrained(DEFAULT_TOKENIZER)
    config = BlipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 40, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_blip_adapter_on_a_tiny_local_checkpoint(tmp_path: Path) -> None:
    from transformers import BlipForImageTextRetrieval

    folder = save_tiny_blip(tmp_path / "blip")
    assert BlipITM.describe(path=str(folder)) == {"pair": 32}
    teacher = BlipITM(path=str(folder)).eval()
    assert teacher.image_preprocess().size == 32 and teacher.max_length == 35
    inputs = batch_inputs(teacher)
    scorer = teacher.encode("pair", inputs)
    i, t = torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1, 1, 0, 3, 2])
    with torch.no_grad():
        scores, feats = scorer(i, t)
        assert scores.shape == (5,) and feats.shape == (5, 32)
        singles = torch.cat([scorer.scores(i[k:k + 1], t[k:k + 1]) for k in range(5)])
        torch.testing.assert_close(singles, scores, atol=1e-5, rtol=1e-5)
        user = BlipForImageTextRetrieval.from_pretrained(str(folder)).eval()  # what a user would write
        itm = user(input_ids=inputs["input_ids"][t], attention_mask=inputs["attention_mask"][t],
                   pixel_values=inputs["pixel_values"][i]).itm_score
    torch.testing.assert_close(scores, itm[:, 1] - itm[:, 0], atol=1e-5, rtol=1e-5)


def test_blip_adapter_rejects_other_models(tmp_path: Path) -> None:
    from tests.test_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(ConfigError, match=f"'{clip}' is a CLIPModel model, not a BLIP image-text retrieval"):
        BlipITM.describe(path=str(clip))
    with pytest.raises(ConfigError, match="BLIP model folder '/no/blip' does not exist"):
        BlipITM.describe(path="/no/blip")
    with pytest.raises(ConfigError, match="use a local folder"):
        BlipITM.describe(path="Salesforce/blip-itm-base-coco")


def test_pair_nodes_only_feed_pair_slots(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    exp = Path(__file__).parent.parent / "experiments" / "fused_teacher_pretrain.yaml"
    args = shrink(exp, data_root, tmp_path, tiny_towers) + [
        "edges.bad.loss=infonce", "edges.bad.inputs=[fused.pair, fused.text]",
        "edges.itm_random.inputs=[fused.image]"]
    with pytest.raises(ConfigError) as e:
        load_checked(exp, args)
    assert e.value.problems == [
        "edges.itm_random.inputs[0]: slot 'pair' of loss 'itm' takes a fused model's pair node (<model>.pair); got 'fused.image'",
        "edges.bad.inputs[0]: slot 'a' of loss 'infonce' takes an embedding node, not a pair scorer; got 'fused.pair'",
    ]
