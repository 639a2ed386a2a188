"""Each model family's image preprocessing equals its own library's, on non-square images:
transformers' image processors (CLIP crops, SigLIP squashes; torchvision and PIL backends),
timm's eval transforms (crop_pct, crop modes), open_clip's transforms (resize modes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.deploy.runtime import preprocess_images
from distill.errors import ConfigError
from distill.models.dual_encoder import DualEncoder, Towers
from distill.models.hf_clip import HFClip
from distill.pixels import PixelSpec, from_hf_processor, from_timm
from tests.test_teachers import save_tiny_siglip

SHAPES = [(96, 48), (48, 96), (37, 101), (43, 40), (40, 43), (64, 64)]
"""(height, width): both orientations, odd crop offsets (rounded vs truncated), square."""


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in SHAPES]


def hf_processors() -> list:
    from transformers import BlipImageProcessor, CLIPImageProcessor, SiglipImageProcessor
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.siglip import SiglipImageProcessorPil

    crop = {"shortest_edge": 40}, {"height": 32, "width": 32}
    return [
        CLIPImageProcessor(size=crop[0], crop_size=crop[1]),
        CLIPImageProcessorPil(size=crop[0], crop_size=crop[1]),
        SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2),  # released SigLIPs: bilinear
        SiglipImageProcessorPil(size={"height": 32, "width": 48}, resample=2),
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2),
        BlipImageProcessor(size={"height": 32, "width": 32}),  # blip_itm: squashed, bicubic
    ]


@pytest.mark.parametrize("index", range(6))
def test_hf_processors(index: int) -> None:
    processor = hf_processors()[index]
    spec = from_hf_processor(processor, "test")
    for image in images():
        ref = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
        np.testing.assert_allclose(spec.to_array(image), ref, atol=1e-5, rtol=0)


def test_spec_reads_what_each_processor_does() -> None:
    clip, clip_pil, siglip, siglip_pil, _, blip = (from_hf_processor(p, "t") for p in hf_processors())
    assert (blip.resize, blip.crop, blip.interpolation) == ("squash", False, "bicubic")
    assert (clip.resize, clip.resize_size, clip.crop, clip.backend) == ("shortest", 40, True, "tensor")
    assert (clip_pil.backend, clip_pil.floor_crop) == ("pil", True)
    assert (siglip.resize, siglip.crop, siglip.interpolation, siglip.out_size) == ("squash", False, "bilinear", (32, 32))
    assert siglip_pil.out_size == (32, 48)


def test_hf_clip_siglip_pixels_and_embeddings_equal_the_processors(tmp_path: Path) -> None:
    """The issue's case: SigLIP on non-square images used to get CLIP's crop (cosine 0.952)."""
    from transformers import AutoImageProcessor, SiglipModel

    folder = save_tiny_siglip(tmp_path / "siglip")
    processor = AutoImageProcessor.from_pretrained(str(folder))
    teacher = HFClip(path=str(folder)).eval()
    user = SiglipModel.from_pretrained(str(folder)).eval()
    pre = teacher.image_preprocess()
    ours = torch.stack([pre(im) for im in images()])
    ref = processor(images=images(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        want = torch.nn.functional.normalize(user.get_image_features(pixel_values=ref).pooler_output, dim=-1)
        cos = (teacher.encode_image(ours) * want).sum(-1)
    assert cos.min() > 0.99999


TIMM_CASES = [("resnet18", {}), ("vit_tiny_patch16_224", {}), ("mobilenetv3_small_100", {}),
              ("resnet18", {"crop_mode": "squash"}), ("resnet18", {"crop_mode": "border"}),
              ("resnet18", {"input_size": (3, 40, 56)}), ("resnet18", {"crop_pct": 1.0, "interpolation": "bicubic"})]


@pytest.mark.parametrize(("name", "override"), TIMM_CASES)
def test_timm_eval_transforms(name: str, override: dict) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(override, model=timm.create_model(name, pretrained=False))
    spec, transform = from_timm(config), create_transform(**config)
    for image in images():
        np.testing.assert_array_equal(spec.to_array(image), transform(image).numpy())


def test_dual_encoder_pretrained_tower_uses_timms_transform(tmp_path: Path) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet18", pretrained=False, num_classes=0), str(tmp_path / "r18"))
    model = DualEncoder(image_model=f"local-dir:{tmp_path / 'r18'}", image_size=48,
                        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 32}, embed_dim=8)
    config = resolve_data_config({"input_size": (3, 48, 48)}, model=model.image_tower)
    assert config["crop_pct"] == 0.95 and model.pixels.resize_size == 50  # resnet18.a1_in1k: floor(48 / 0.95)
    pre, transform = model.image_preprocess(), create_transform(**config)
    for image in images():
        torch.testing.assert_close(pre(image), transform(image), atol=0, rtol=0)
    scratch = DualEncoder(image_model="resnet18", image_size=48, text_config={"hidden_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 32}, embed_dim=8)
    assert scratch.pixels == PixelSpec(size=48, mean=tuple(config["mean"]), std=tuple(config["std"]))  # scratch: square
    # a towers folder keeps the transform it was trained with
    back = Towers(path=str(model.save_pretrained(tmp_path / "towers")))
    assert back.pixels == model.pixels
    with pytest.raises(ConfigError, match="image_transform must be one of auto, timm, square, got 'crop'"):
        DualEncoder.describe(image_model="resnet18", image_transform="crop")


OPEN_CLIP_CASES = [{}, {"resize_mode": "squash"}, {"resize_mode": "longest", "fill_color": 128},
                   {"interpolation": "bilinear"}, {"size": (48, 64)}]


@pytest.mark.parametrize("override", OPEN_CLIP_CASES)
def test_open_clip_transforms(override: dict) -> None:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from distill.models.openclip import pixels_of

    cfg = {**open_clip.transform.asdict(PreprocessCfg(size=64)), **override}
    spec = pixels_of(cfg)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    for image in images():
        np.testing.assert_array_equal(spec.to_array(image), transform(image).numpy())


def test_export_runtime_reads_every_option() -> None:
    spec = PixelSpec(size=(32, 48), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), resize="longest",
                     resize_size=(30, 40), interpolation="bilinear", fill=(10, 20, 30))
    back = PixelSpec.from_dict(spec.to_dict())
    assert back == spec and back.key() == spec.key() != PixelSpec(size=32, mean=spec.mean, std=spec.std).key()
    got = preprocess_images(images(), back)
    assert got.shape == (len(SHAPES), 3, 32, 48)
    np.testing.assert_array_equal(got[0], spec.to_array(images()[0]))


def test_legacy_default_keeps_its_cache_key() -> None:
    """Entries cached before the options existed stay valid: the default key is unchanged."""
    assert PixelSpec(size=64, mean=(0.5,) * 3, std=(0.5,) * 3).key() == ("image", 64, (0.5,) * 3, (0.5,) * 3)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="image resize mode 'crop' is not one of shortest, squash, longest"):
        PixelSpec(size=32, mean=(0,) * 3, std=(1,) * 3, resize="crop")
    with pytest.raises(ConfigError, match="image interpolation 'cubic' is not one of"):
        PixelSpec(size=32, mean=(0,) * 3, std=(1,) * 3, interpolation="cubic")


def test_siglip_captions_are_padded_to_the_full_length_it_pools_from(tmp_path: Path) -> None:
    """SigLIP's text tower pools the last position: padded to the longest caption, a short
    caption would be pooled from a pad token."""
    from transformers import AutoTokenizer, SiglipModel

    folder = save_tiny_siglip(tmp_path / "siglip")
    teacher = HFClip(path=str(folder)).eval()
    captions = ["a red circle", "two small blue squares to the left of a large green triangle"]
    tokens = teacher.text_preprocess()(captions)
    assert tokens["input_ids"].shape == (2, 24)  # the model's 24 positions, not the longest caption
    user = SiglipModel.from_pretrained(str(folder)).eval()
    ref = AutoTokenizer.from_pretrained(str(folder))(captions, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        want = torch.nn.functional.normalize(user.get_text_features(**ref).pooler_output, dim=-1)
        torch.testing.assert_close(teacher.encode_text(tokens["input_ids"], tokens["attention_mask"]), want)
    assert teacher.text_preprocess().key()[-1] == "max_length"
