"""Model loaders on tiny checkpoints saved by the tests (no download happens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.errors import ConfigError
from distill.models._hf import DEFAULT_TOKENIZER
from distill.models.dual_encoder import DualEncoder, Towers
from distill.models.hf_clip import HFClip
from distill.registry import MODELS

TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


def tiny_student(**kw: object) -> DualEncoder:
    args = dict(image_model="test_resnet", image_size=32, text_config=TEXT, embed_dim=24)
    args.update(kw)
    return DualEncoder(**args)  # type: ignore[arg-type]


def inputs(model: DualEncoder | HFClip, n: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.randn(n, 3, model.image_preprocess().size, model.image_preprocess().size)
    return pixels, model.text_preprocess()(["a red circle", "two blue squares left of a star", "green"][:n])


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_has_describe(name: str) -> None:
    cls = MODELS.get(name)
    assert callable(cls.describe) and cls.outputs and set(cls.outputs) <= {"image", "text", "pair"}


def test_dual_encoder_forward_backward_and_shapes() -> None:
    model = tiny_student()
    pixels, text = inputs(model)
    img, txt = model.encode_image(pixels), model.encode_text(**text)
    assert img.shape == txt.shape == (3, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    (img * txt).sum().backward()
    assert model.image_proj.weight.grad is not None and model.text_proj.weight.grad is not None


def test_towers_round_trip_through_each_library_format(tmp_path: Path) -> None:
    model = tiny_student().eval()
    folder = model.save_pretrained(tmp_path / "towers")
    assert (folder / "image" / "config.json").is_file() and (folder / "image" / "model.safetensors").is_file()
    assert (folder / "text" / "config.json").is_file() and (folder / "tokenizer").is_dir()
    assert Towers.describe(path=str(folder)) == {"image": 24, "text": 24}
    loaded = Towers(path=str(folder)).eval()
    pixels, text = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
        torch.testing.assert_close(loaded.encode_text(**text), model.encode_text(**text))
    # the text tower is a plain transformers folder: a user can point text_model at it
    user = tiny_student(text_model=str(folder / "text"), tokenizer=str(folder / "tokenizer"))
    torch.testing.assert_close(user.text_tower.embeddings.word_embeddings.weight,
                               model.text_tower.embeddings.word_embeddings.weight)


def save_tiny_clip(folder: Path) -> Path:
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = BertTokenizerFast.from_pretrained(DEFAULT_TOKENIZER)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 40},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=20,
    )
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_clip_from_a_local_folder(tmp_path: Path) -> None:
    folder = save_tiny_clip(tmp_path / "clip")
    assert HFClip.describe(path=str(folder)) == {"image": 20, "text": 20}
    teacher = HFClip(path=str(folder))
    assert teacher.image_preprocess().size == 32 and teacher.max_length == 40
    pixels, text = inputs(teacher)
    assert teacher.encode_image(pixels).shape == (3, 20) and teacher.encode_text(**text).shape == (3, 20)


def test_missing_folders_and_unknown_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model folder '/no/such/clip' does not exist"):
        HFClip.describe(path="/no/such/clip")
    with pytest.raises(ConfigError, match="not a towers folder"):
        Towers.describe(path=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown timm model 'resnet1'; did you mean 'resnet1"):
        DualEncoder.describe(image_model="resnet1")
    with pytest.raises(ConfigError, match="use a local folder"):
        HFClip.describe(path="someone/not-cached-clip-model")
