"""open_clip models as teachers and students: parity with open_clip itself, locally saved
weights, cacheable teacher outputs, TinyCLIP-style inheritance, the shipped experiment."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from distill.commands.cli import main
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.models.inherit import inherit, pick_layers
from tests.conftest import TINY, save_random_open_clip, shrink

open_clip = pytest.importorskip("open_clip")

from distill.models.openclip import OpenClip  # noqa: E402 - after the importorskip

TINY_ARCH = {"embed_dim": 24, "vision_cfg": {"width": 32, "layers": 2, "patch_size": 8, "image_size": 32,
                                             "head_width": 16},
             "text_cfg": {"width": 32, "heads": 2, "layers": 2, "context_length": 16}}
"""ViT-B-32's layout shrunk (open_clip builds it with `config:` merged onto its own)."""
EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "openclip_vitb32_to_small.yaml"
CAPTIONS = ["a red circle", "two small blue squares to the left of a large green triangle", "x " * 90]


def odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in ((96, 48, 3), (48, 96, 3), (70, 70, 3))]


def test_nodes_equal_open_clips_own_encoders_on_a_real_architecture(tmp_path: Path) -> None:
    """ViT-S-32 with random weights saved to a local file and loaded back by both sides."""
    file = save_random_open_clip(tmp_path / "vit_s_32.safetensors", "ViT-S-32")
    ours = OpenClip(model="ViT-S-32", pretrained=str(file), image_size=64).eval()
    ref, _, transform = open_clip.create_model_and_transforms("ViT-S-32", pretrained=str(file), force_image_size=64)
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    ref.eval()
    assert OpenClip.describe(model="ViT-S-32") == {"image": 384, "text": 384}
    images = odd_images()
    pixels = torch.stack([ours.image_preprocess()(im) for im in images])
    torch.testing.assert_close(pixels, torch.stack([transform(im) for im in images]), atol=0, rtol=0)
    tokens = ours.text_preprocess()(CAPTIONS)
    assert torch.equal(tokens["input_ids"], tokenizer(CAPTIONS)) and tokens["input_ids"].shape == (3, 77)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), ref.encode_image(pixels, normalize=True))
        torch.testing.assert_close(ours.encode("text", tokens), ref.encode_text(tokenizer(CAPTIONS), normalize=True))


def test_config_merges_onto_the_architecture_and_weights_round_trip(tmp_path: Path) -> None:
    model = OpenClip(model="ViT-B-32", config=TINY_ARCH)
    assert model.model.visual.transformer.width == 32 and len(model.model.transformer.resblocks) == 2
    assert model.model_cfg["vision_cfg"]["patch_size"] == 8 and model.model_cfg["text_cfg"]["vocab_size"] == 49408
    file = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(file))
    back = OpenClip(model="ViT-B-32", config=TINY_ARCH, pretrained=str(file))
    for k, v in model.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    assert OpenClip.describe(model="ViT-B-32", config=TINY_ARCH) == {"image": 24, "text": 24}


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-B-23'; did you mean 'ViT-B-32'"):
        OpenClip.describe(model="ViT-B-23")
    with pytest.raises(ConfigError, match="pretrained checkpoint file '/no/such.pt' does not exist"):
        OpenClip.describe(model="ViT-B-32", pretrained="/no/such.pt")
    with pytest.raises(ConfigError, match="'ViT-B-32' has no pretrained tag 'laion9b'.*laion2b_s34b_b79k"):
        OpenClip.describe(model="ViT-B-32", pretrained="laion9b")
    with pytest.raises(ConfigError, match="precision must be one of fp32, fp16, bf16, got 'fp8'"):
        OpenClip.describe(model="ViT-B-32", precision="fp8")
    with pytest.raises(ConfigError, match="open_clip folder .* has no open_clip_config.json"):
        OpenClip.describe(model=f"local-dir:{tmp_path}")


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(ConfigError, match=r"need open_clip_torch: pip install 'distill\[open_clip\]'"):
        OpenClip.describe(model="ViT-B-32")


def tiny_open_clip_config(tmp_path: Path, data_root: Path, file: Path) -> Path:
    """The tiny test graph with an open_clip teacher (24-d, like the tiny teacher it replaces)."""
    text = TINY.format(out=tmp_path / "run", data=data_root)
    teacher = "type: tiny_dual\n    frozen: true\n    args: {embed_dim: 24, image_size: 32}"
    arch = "{embed_dim: 24, vision_cfg: {width: 32, layers: 2, patch_size: 8, image_size: 32, head_width: 16}, " \
           "text_cfg: {width: 32, heads: 2, layers: 2, context_length: 16}}"
    assert teacher in text
    text = text.replace(teacher, f"type: open_clip\n    frozen: true\n    args: {{model: ViT-B-32, "
                                 f"pretrained: '{file}', config: {arch}}}")
    path = tmp_path / "oc.yaml"
    path.write_text(text + f"cache: {{dir: '{tmp_path / 'cache'}'}}\n")
    return path


def never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the cached teacher ran")


def test_teacher_outputs_are_cached_and_read_back(tmp_path: Path, data_root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.training.cache.store import resolve_cache

    model = OpenClip(model="ViT-B-32", config=TINY_ARCH)
    file = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(file))
    path = tiny_open_clip_config(tmp_path, data_root, file)
    assert main(["cache", str(path)]) == 0
    assert set(resolve_cache(load_checked(path, ["cache.mode=require"]))) == {"teacher.image", "teacher.text"}
    monkeypatch.setattr(OpenClip, "encode", never)
    assert main(["fit", str(path), "cache.mode=require", "trainer.max_steps=2", f"output_dir={tmp_path / 'fit'}"]) == 0
    assert (tmp_path / "fit" / "final.ckpt").is_file()


def test_tinyclip_inheritance_copies_picked_layers_and_leading_slices() -> None:
    teacher = OpenClip(model="ViT-B-32", config={**TINY_ARCH, "vision_cfg": {**TINY_ARCH["vision_cfg"], "layers": 4}})
    small = {"embed_dim": 16, "vision_cfg": {**TINY_ARCH["vision_cfg"], "width": 16, "layers": 2},
             "text_cfg": {**TINY_ARCH["text_cfg"], "width": 16, "layers": 1}}
    student = OpenClip(model="ViT-B-32", config=small)
    written = inherit(student, teacher, slice=True,
                      tensors={"model.visual.conv1": "model.visual.conv1", "model.token_embedding": "model.token_embedding"},
                      layers={"model.visual.transformer.resblocks": {"from": "model.visual.transformer.resblocks"},
                              "model.transformer.resblocks": {"from": "model.transformer.resblocks", "pick": "last"}})
    assert pick_layers(4, 2, "uniform") == [0, 3]
    s, t = student.state_dict(), teacher.state_dict()
    for i, j in ((0, 0), (1, 3)):
        key = "model.visual.transformer.resblocks.{}.mlp.c_fc.weight"
        assert torch.equal(s[key.format(i)], t[key.format(j)][:64, :16])  # mlp 4x16 rows of the 4x32
    assert torch.equal(s["model.transformer.resblocks.0.ln_1.weight"], t["model.transformer.resblocks.1.ln_1.weight"][:16])
    assert torch.equal(s["model.visual.conv1.weight"], t["model.visual.conv1.weight"][:16])
    assert "model.token_embedding.weight" in written


def test_the_experiment_validates_and_fits_with_locally_saved_vit_b_32(
    data_root: Path, tiny_towers: Path, tmp_path: Path,
) -> None:
    args = shrink(EXPERIMENT, data_root, tmp_path / "run", tiny_towers, steps=2)
    cfg = load_checked(EXPERIMENT, args)
    assert cfg.models["teacher"].args["pretrained"].endswith("ViT-B-32.safetensors")
    assert main(["fit", str(EXPERIMENT), *args]) == 0
    state = torch.load(tmp_path / "run" / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["graph.models.student.model.visual.conv1.weight"].shape == (384, 3, 32, 32)
