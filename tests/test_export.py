"""`distill export`: ONNX and TorchScript folders, parity, int8 text, the runtime, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.commands.cli import main
from distill.deploy.export import export_checkpoint
from distill.deploy.parity import (
    INT8_MIN_COSINE,
    MIN_COSINE,
    ParityError,
    eval_items,
    text_recall_cost,
)
from distill.deploy.runtime import ExportedModel, preprocess_images
from tests.conftest import write_yaml

# A dual encoder with a real transformer text tower (attention masks and padding are traced).
DUAL = """
name: tiny_export
output_dir: {out}
models:
  student:
    type: dual_encoder
    args:
      image_model: test_resnet
      image_size: 32
      embed_dim: 16
      max_length: 24
      text_config: {{model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                    intermediate_size: 64, max_position_embeddings: 64}}
edges:
  si_st:
    loss: infonce
    inputs: [student.image, student.text]
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
  batch_size: 16
  eval_batch_size: 12
  num_workers: 0
  shuffle_buffer: 50
trainer: {{max_steps: 2, log_every_n_steps: 1, checkpoint_every_n_steps: 2, progress_bar: false}}
optim: {{warmup_steps: 1}}
"""

MANIFEST_KEYS = {"format", "model", "embed_dim", "image", "text", "tokenizer", "source", "parity", "weights"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """`final.ckpt` of a 2-step train of the tiny dual encoder."""
    from distill.core.check import load_checked
    from distill.training.stages import train

    folder = tmp_path_factory.mktemp("export_fit")
    train(load_checked(write_yaml(folder, "dual.yaml", DUAL.format(out=folder / "run", data=data_root))))
    return folder / "run" / "final.ckpt"


@pytest.fixture(scope="module")
def onnx_folder(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(checkpoint, format="onnx", output=tmp_path_factory.mktemp("onnx") / "export")


def _encoder(checkpoint: Path):  # noqa: ANN202 - an Encoder
    from distill.training.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).graph.models["student"].eval()


def _odd_images() -> list[Image.Image]:
    """Images of shapes the training data never has: tall, wide, small, with alpha."""
    rng = np.random.default_rng(0)
    shapes = [(37, 50), (90, 41), (20, 20), (33, 64)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    return [*images, images[0].convert("RGBA")]


def test_onnx_export_folder_and_parity(onnx_folder: Path, checkpoint: Path) -> None:
    manifest = json.loads((onnx_folder / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["format"] == "onnx" and manifest["model"] == "student" and manifest["embed_dim"] == 16
    assert manifest["image"] == {
        "file": "image.onnx", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "shortest",
        "resize_size": None, "crop": True, "interpolation": "bicubic", "backend": "pil", "fill": 0, "floor_crop": False,
    }
    assert manifest["text"] == {"file": "text.onnx", "max_length": 24, "padding": "longest", "quantized": None}
    assert manifest["source"] == str(checkpoint.resolve()) and manifest["weights"] is None
    assert (onnx_folder / "tokenizer" / "tokenizer.json").is_file()
    parity = manifest["parity"]
    assert parity["image"] >= MIN_COSINE and parity["text"] >= MIN_COSINE
    assert parity["images"] == 12 and parity["captions"] == 60  # the whole tiny test split
    assert not list(onnx_folder.parent.glob(".export*"))  # no temporary folder left behind


def test_runtime_matches_pytorch_on_unseen_shapes(onnx_folder: Path, checkpoint: Path) -> None:
    encoder = _encoder(checkpoint)
    model = ExportedModel(onnx_folder, threads=1)
    images = _odd_images()
    pre = encoder.image_preprocess()
    from torchvision.transforms import functional as F  # the pipeline the defaults reproduce

    def torchvision_pixels(im):
        im = F.resize(im.convert("RGB"), pre.size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.normalize(F.to_tensor(F.center_crop(im, [pre.size, pre.size])), list(pre.mean), list(pre.std))

    np.testing.assert_array_equal(
        preprocess_images(images, pre), torch.stack([torchvision_pixels(im) for im in images]).numpy()
    )
    texts = ["a red circle", "two small blue squares to the left of a large green triangle", "x " * 40]
    with torch.inference_mode():
        ref_image = encoder.encode_image(torch.stack([pre(im) for im in images])).numpy()
        ref_text = encoder.encode_text(**encoder.text_preprocess()(texts)).numpy()
    got_image, got_text = model.encode_images(images), model.encode_texts(texts)
    assert got_image.dtype == got_text.dtype == np.float32 and got_image.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(got_text, axis=1), 1.0, atol=1e-5)
    assert (got_image * ref_image).sum(1).min() > MIN_COSINE
    assert (got_text * ref_text).sum(1).min() > MIN_COSINE
    assert model.encode_texts(texts[:1]).shape == (1, 16) and model.encode_texts([]).shape == (0, 16)
    assert model.tokenize(texts[:1])["input_ids"].shape[1] < 24  # padded to the query, not max_length


def test_torchscript_export_and_parity(checkpoint: Path, tmp_path: Path) -> None:
    folder = export_checkpoint(checkpoint, format="torchscript", output=tmp_path / "ts")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "torchscript" and manifest["image"]["file"] == "image.pt"
    assert (folder / "image.pt").is_file() and (folder / "text.pt").is_file()
    assert min(manifest["parity"]["image"], manifest["parity"]["text"]) >= MIN_COSINE
    emb = ExportedModel(folder).encode_texts(["a red circle", "a blue square above a green star"])
    assert emb.shape == (2, 16)


def test_broken_parity_fails_loudly_and_keeps_the_earlier_export(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    export_checkpoint(checkpoint, format="onnx", output=out)
    before = (out / "manifest.json").read_text()
    real = ExportedModel.encode_images

    def perturbed(self: ExportedModel, images: list, batch_size: int = 64) -> np.ndarray:
        emb = real(self, images, batch_size) + 0.05 * np.random.default_rng(0).standard_normal((len(images), self.embed_dim))
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(ExportedModel, "encode_images", perturbed)
    with pytest.raises(ParityError, match=r"export/image\.onnx: image parity failed: worst cosine 0\.9\d+ < 0\.9999") as e:
        export_checkpoint(checkpoint, format="onnx", output=out)
    assert "\n" not in str(e.value)
    assert (out / "manifest.json").read_text() == before  # the earlier, good export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # and no half-written folder


def test_int8_text_export_reports_its_recall_cost(checkpoint: Path, onnx_folder: Path, tmp_path: Path) -> None:
    folder = export_checkpoint(checkpoint, format="onnx", output=tmp_path / "int8", quantize_text="int8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["text"]["quantized"] == "int8" and manifest["image"]["file"] == "image.onnx"
    parity = manifest["parity"]
    assert parity["text"] >= INT8_MIN_COSINE and parity["text_fp32"] >= MIN_COSINE and parity["image"] >= MIN_COSINE
    cost = parity["int8_recall"]
    assert cost["split"] == "test" and cost["images"] == 12 and cost["captions"] == 60
    assert set(cost["fp32"]) == set(cost["int8"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum"}
    assert cost["rsum_drop"] == pytest.approx(cost["fp32"]["rsum"] - cost["int8"]["rsum"])
    assert (folder / "text.onnx").stat().st_size < (onnx_folder / "text.onnx").stat().st_size
    assert not (folder / "text.int8.onnx").exists()


def test_text_recall_cost_of_identical_encoders_is_zero(onnx_folder: Path, checkpoint: Path) -> None:
    from distill.training.checkpoint import load_checkpoint

    model = ExportedModel(onnx_folder, threads=1)
    split, items = eval_items(load_checkpoint(checkpoint).config, limit=8)
    cost = text_recall_cost(model, model, items)
    assert split == "test" and cost["images"] == 8 and cost["captions"] == 40
    assert cost["fp32"] == cost["int8"] and cost["rsum_drop"] == 0


def test_cli_export_with_weights(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_model

    from distill.registry import MODELS

    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(_odd_images()[:4]):
        im.save(images / f"{i}.png")
    out = tmp_path / "cli"
    assert main(["export", str(checkpoint), "--output", str(out), "--weights", "--images", str(images)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: onnx, model 'student', 16-d" in printed and "over 4 images / 60 captions" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["weights"]
    assert spec["file"] == "weights.safetensors" and spec["type"] == "dual_encoder"
    rebuilt = MODELS.get(spec["type"])(**spec["args"]).eval()
    load_model(rebuilt, str(out / "weights.safetensors"))
    tokens = rebuilt.text_preprocess()(["a red circle"])
    with torch.inference_mode():
        expected = _encoder(checkpoint).encode_text(**tokens)
        torch.testing.assert_close(rebuilt.encode_text(**tokens), expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/run/final.ckpt"], "error: checkpoint '/no/such/run/final.ckpt' does not exist"),
        (["CKPT", "--format", "onnxx"], "error: --format: unknown value 'onnxx' (choose from onnx, torchscript, open_clip, hf); did you mean 'onnx'?"),
        (["CKPT", "--format", "torchscript", "--quantize-text", "int8"], "error: --quantize-text: quantisation needs --format onnx"),
        (["CKPT", "--quantize-text", "int4"], "error: --quantize-text: unknown value 'int4'"),
        (["CKPT", "--model", "studnt"], "error: --model: 'studnt' is not a model of"),
    ],
)
def test_cli_export_errors_exit_2(
    args: list[str], message: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", *[str(checkpoint) if a == "CKPT" else a for a in args], "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_export_refuses_to_replace_another_folder(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["export", str(checkpoint), "--output", str(tmp_path / "notes")]) == 2
    assert "exists and is not an export folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
