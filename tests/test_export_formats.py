"""`distill export --format open_clip | hf`: folders their own library loads in a fresh process
without `distill`, whose embeddings equal the student's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.commands.cli import main
from distill.deploy.parity import MIN_COSINE
from distill.errors import ConfigError
from distill.pixels import PixelSpec
from tests.conftest import write_yaml
from tests.test_export import DUAL

open_clip = pytest.importorskip("open_clip")

from distill.deploy.export_openclip import final_layer_norm, preprocess_cfg  # noqa: E402 - after the importorskip

TINY_VIT = {"embed_dim": 16,
            "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
"""A tiny open_clip ViT; the student overrides its image size, context length and text depth."""

OPEN_CLIP_STUDENT = ("\n    type: open_clip\n    args: {model: distill-test-vit, image_size: 32, context_length: 20, "
                     "config: {text_cfg: {layers: 1}}}")

OPEN_CLIP_USER = """
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

folder, images, captions, out = sys.argv[1:]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
pics = [Image.open(p) for p in sorted(Path(images).iterdir())]
texts = Path(captions).read_text().splitlines()
with torch.no_grad():
    np.save(Path(out) / "image.npy", model.encode_image(torch.stack([preprocess(im) for im in pics]), normalize=True).numpy())
    np.save(Path(out) / "text.npy", model.encode_text(tokenizer(texts), normalize=True).numpy())
assert not [m for m in sys.modules if m.split(".")[0] == "distill"], "distill was imported"
"""

HF_USER = """
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

folder, images, captions, out = sys.argv[1:]
model = AutoModel.from_pretrained(folder).eval()
tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
pics = [Image.open(p) for p in sorted(Path(images).iterdir())]
texts = Path(captions).read_text().splitlines()
with torch.no_grad():
    image = model.get_image_features(**processor(images=pics, return_tensors="pt")).pooler_output
    text = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
np.save(Path(out) / "image.npy", torch.nn.functional.normalize(image, dim=-1).numpy())
np.save(Path(out) / "text.npy", torch.nn.functional.normalize(text, dim=-1).numpy())
assert not [m for m in sys.modules if m.split(".")[0] == "distill"], "distill was imported"
"""

CAPTIONS = ["a red circle", "two small blue squares to the left of a large green triangle",
            "a   green star above   a yellow circle", "the blue triangle"]


def _train(folder: Path, data_root: Path, student: str | None = None) -> Path:
    """`final.ckpt` of a 2-step fit of the export tests' dual encoder config, its student replaced."""
    from distill.core.check import load_checked
    from distill.training.stages import train

    text = DUAL.format(out=folder / "run", data=data_root)
    if student is not None:
        start = text.index("    type: dual_encoder")
        end = text.index("edges:")
        text = text[:start].rstrip("\n") + student + "\n" + text[end:]
    train(load_checked(write_yaml(folder, "student.yaml", text)))
    return folder / "run" / "final.ckpt"


def save_tiny_clip(folder: Path) -> Path:
    """A tiny transformers CLIP folder (model, tokenizer, image processor), random weights."""
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    from distill.models._hf import DEFAULT_TOKENIZER

    tok = BertTokenizerFast.from_pretrained(DEFAULT_TOKENIZER)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dual_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return _train(tmp_path_factory.mktemp("dual"), data_root)


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "configs").mkdir()
    (folder / "configs" / "distill-test-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(folder / "configs")
    return _train(folder, data_root, OPEN_CLIP_STUDENT)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    clip = save_tiny_clip(folder / "clip")
    return _train(folder, data_root, f"\n    type: hf_clip\n    args: {{path: '{clip}', max_length: 24}}")


def _inputs(folder: Path) -> tuple[Path, Path]:
    """Images of shapes the training data never has (tall, wide, small) and captions, on disk."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(37, 50), (90, 41), (20, 20), (33, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    captions = folder / "captions.txt"
    captions.write_text("\n".join(CAPTIONS))
    return images, captions


def _in_fresh_process(script: str, folder: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Run a user's script on the export in a new interpreter, offline, outside the repository."""
    images, captions = _inputs(tmp_path)
    (tmp_path / "user.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, str(tmp_path / "user.py"), str(folder), str(images), str(captions), str(tmp_path)],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    return np.load(tmp_path / "image.npy"), np.load(tmp_path / "text.npy")


def _ours(checkpoint: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The student's embeddings in PyTorch, with its own preprocessing and tokenizer."""
    from distill.training.checkpoint import load_checkpoint

    encoder = load_checkpoint(checkpoint).graph.models["student"].float().eval()
    pics = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "images").iterdir())]
    with torch.inference_mode():
        image = encoder.encode_image(torch.stack([encoder.image_preprocess()(im) for im in pics]))
        text = encoder.encode_text(**encoder.text_preprocess()(CAPTIONS))
    return image.numpy(), text.numpy()


def _worst(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _export(checkpoint: Path, fmt: str, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    library = {"open_clip": "open_clip", "hf": "transformers"}[fmt]
    assert f"wrote {out}: {fmt}, model 'student', 16-d" in printed and f"loaded back by {library} vs PyTorch" in printed
    info = json.loads((out / "distill_export.json").read_text())
    assert info["format"] == fmt and info["source"] == str(checkpoint.resolve())
    assert info["parity"]["image"] >= MIN_COSINE and info["parity"]["text"] >= MIN_COSINE
    assert info["parity"]["images"] == 12 and info["parity"]["captions"] == 60  # the tiny test split
    assert not (out / "manifest.json").exists() and not list(out.parent.glob(".tmp-*"))
    return info


def test_dual_encoder_leaves_as_an_open_clip_folder(
    dual_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "oc"
    info = _export(dual_checkpoint, "open_clip", out, capsys)
    assert info["text_bias"]["folded_into"] == "text.transformer.encoder.layer.0.output.LayerNorm.bias"
    assert info["absolute_paths"] == {"text_cfg.hf_model_name": str(out.resolve() / "hf_text")}
    config = json.loads((out / "open_clip_config.json").read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["timm_model_name"] == "test_resnet" and vision["timm_pool"] == "" and vision["timm_proj_bias"]
    assert text["hf_pooler_type"] == "mean_pooler" and text["hf_proj_type"] == "linear" and text["context_length"] == 24
    assert text["hf_model_name"] == str(out.resolve() / "hf_text")  # the final place, not the temporary one
    assert config["preprocess_cfg"] == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                        "resize_mode": "shortest", "fill_color": 0}
    image, text_emb = _in_fresh_process(OPEN_CLIP_USER, out, tmp_path)
    ref_image, ref_text = _ours(dual_checkpoint, tmp_path)
    assert _worst(image, ref_image) >= MIN_COSINE and _worst(text_emb, ref_text) >= MIN_COSINE


def test_open_clip_student_leaves_as_its_own_architecture(
    open_clip_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "oc"
    _export(open_clip_checkpoint, "open_clip", out, capsys)
    config = json.loads((out / "open_clip_config.json").read_text())
    vision, text_cfg = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["image_size"] == 32 and text_cfg["context_length"] == 20 and text_cfg["layers"] == 1  # as built
    assert config["preprocess_cfg"]["size"] == 32 and not (out / "hf_text").exists()
    image, text = _in_fresh_process(OPEN_CLIP_USER, out, tmp_path)
    ref_image, ref_text = _ours(open_clip_checkpoint, tmp_path)
    assert text.shape == (4, 16) and _worst(image, ref_image) >= MIN_COSINE and _worst(text, ref_text) >= MIN_COSINE
    # an earlier export is recognised and replaced whole
    assert main(["export", str(open_clip_checkpoint), "--format", "open_clip", "--out", str(out)]) == 0


def test_hf_clip_student_leaves_as_a_transformers_folder(
    hf_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    info = _export(hf_checkpoint, "hf", out, capsys)
    assert info["architecture"] == "CLIPModel" and info["type"] == "hf_clip"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    image, text = _in_fresh_process(HF_USER, out, tmp_path)
    ref_image, ref_text = _ours(hf_checkpoint, tmp_path)
    assert _worst(image, ref_image) >= MIN_COSINE and _worst(text, ref_text) >= MIN_COSINE


@pytest.mark.parametrize(
    ("fixture", "fmt", "message"),
    [
        ("dual_checkpoint", "hf", "error: --format hf: model 'student' (dual_encoder, DualEncoder) exports only as "
                                  "onnx, torchscript, open_clip"),
        ("hf_checkpoint", "open_clip", "error: --format open_clip: model 'student' (hf_clip, HFClip) exports only as "
                                       "onnx, torchscript, hf"),
        ("dual_checkpoint", "open_clp", "error: --format: unknown value 'open_clp' (choose from onnx, torchscript, "
                                        "open_clip, hf); did you mean 'open_clip'?"),
    ],
)
def test_formats_that_do_not_apply_are_one_line_errors(
    fixture: str, fmt: str, message: str, request: pytest.FixtureRequest, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = request.getfixturevalue(fixture)
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not transformers' progress bars
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "x").exists()


def test_a_text_projection_that_cannot_absorb_its_bias_is_refused(
    dual_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(dual_checkpoint, map_location="cpu", weights_only=False)
    (key,) = [k for k in ckpt["state_dict"] if k.endswith("student.text_proj.weight")]
    ckpt["state_dict"][key][:4] = 0  # four output rows see nothing: their bias has no preimage
    torch.save(ckpt, tmp_path / "rank.ckpt")
    assert main(["export", str(tmp_path / "rank.ckpt"), "--format", "open_clip", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: --format open_clip: text_proj (16 x 32, rank 12) cannot absorb its bias" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_text_tower_without_a_final_layer_norm_is_refused(dual_checkpoint: Path) -> None:
    from distill.training.checkpoint import load_checkpoint

    encoder = load_checkpoint(dual_checkpoint).graph.models["student"].eval()
    tokens = encoder.text_preprocess()(CAPTIONS)
    assert final_layer_norm(encoder.text_tower, tokens) == "encoder.layer.0.output.LayerNorm"
    encoder.text_tower.encoder.layer[0].output.LayerNorm = torch.nn.Identity()  # a residual sum comes out
    with pytest.raises(ConfigError, match=r"last hidden state does not come out of a LayerNorm with a bias") as e:
        final_layer_norm(encoder.text_tower, tokens)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PixelSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=36), "resizes to 36 before cropping to 32"),
        (PixelSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, backend="tensor"), "transformers' arithmetic"),
        (PixelSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="lanczos"), "interpolation 'lanczos'"),
    ],
)
def test_preprocessing_open_clip_cannot_express_is_refused(spec: PixelSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        preprocess_cfg(spec)


def test_preprocessing_maps_onto_open_clips_modes() -> None:
    from distill.models.openclip import pixels_of

    for spec in (PixelSpec(size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
                 PixelSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, resize="squash", crop=False),
                 PixelSpec(size=(32, 48), mean=(0.5,) * 3, std=(0.5,) * 3, resize="longest", fill=128)):
        assert pixels_of(preprocess_cfg(spec)) == spec


def test_a_failed_parity_check_leaves_nothing_behind(
    dual_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.deploy.export_openclip import OpenClipFolder

    real = OpenClipFolder.encode_texts
    monkeypatch.setattr(OpenClipFolder, "encode_texts", lambda self, captions: real(self, captions)[:, ::-1].copy())
    assert main(["export", str(dual_checkpoint), "--format", "open_clip", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'x'}/open_clip_model.safetensors: text parity failed: worst cosine" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the folder nor a temporary one
