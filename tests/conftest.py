"""Shared fixtures: tiny configs that run on a CPU in seconds."""

from __future__ import annotations

import importlib
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never reach a model hub: loaders are exercised on folders the tests save themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--distill-plugins", dest="distill_plugins", default=os.environ.get("DISTILL_PLUGINS", ""),
                     help="comma-separated plugin modules to import before collection, so the tests "
                          "parametrized over the registries (e.g. tests/test_losses.py) cover them too")


def pytest_configure(config: pytest.Config) -> None:
    for name in filter(None, (m.strip() for m in config.getoption("distill_plugins").split(","))):
        importlib.import_module(name)


TINY = """
name: tiny
output_dir: {out}
models:
  student:
    type: tiny_dual
    args: {{embed_dim: 16, image_size: 32}}
  teacher:
    type: tiny_dual
    frozen: true
    args: {{embed_dim: 24, image_size: 32}}
edges:
  si_st:
    loss: infonce
    inputs: [student.image, student.text]
    args: {{temperature: 0.1, learnable: true}}
  si_tt:
    loss: infonce
    inputs: [student.image, teacher.text]
  st_ti_kl:
    loss: similarity_kl
    inputs: [student.text, student.image, teacher.text, teacher.image]
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
  batch_size: 16
  eval_batch_size: 12
  num_workers: 0
  shuffle_buffer: 50
trainer:
  max_steps: 6
  log_every_n_steps: 1
  checkpoint_every_n_steps: 3
  progress_bar: false
optim:
  warmup_steps: 2
"""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny embedded dataset per test session (generated on first use)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def tiny_yaml(tmp_path: Path, data_root: Path) -> Path:
    """A tiny teacher + student graph config written to a temporary folder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "run", data=data_root))
    return path


def write_yaml(folder: Path, name: str, text: str) -> Path:
    """Write a dedented YAML file and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="session")
def tiny_towers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny towers teacher (timm image folder + transformers text folder) saved once."""
    from distill.models.dual_encoder import DualEncoder

    folder = tmp_path_factory.mktemp("teacher") / "towers"
    model = DualEncoder(image_model="test_resnet", image_size=32, embed_dim=24,
                        text_config={"model_type": "bert", "max_position_embeddings": 64, **TINY_TEXT})
    return model.save_pretrained(folder)


TINY_FUSION = {"width": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "image_size": 32, "patch_size": 8, "max_length": 32}


def save_tiny_text(folder: Path, layers: int = 3) -> Path:
    """A tiny BERT sentence encoder folder (model, tokenizer, mean pooling), as `hf_text` reads."""
    import json

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from distill.models._hf import DEFAULT_TOKENIZER

    tok = BertTokenizerFast.from_pretrained(DEFAULT_TOKENIZER)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=64, **{**TINY_TEXT, "num_hidden_layers": layers})
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def save_tiny_fusion(folder: Path) -> Path:
    """A tiny (untrained) fusion teacher folder."""
    from distill.models.fusion import Fusion

    return Fusion(**TINY_FUSION).save_pretrained(folder)  # type: ignore[arg-type]


def save_random_open_clip(file: Path, arch: str) -> Path:
    """Random weights of an open_clip architecture as a local checkpoint file (once)."""
    if not file.is_file():
        import open_clip
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        state = open_clip.create_model(arch).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


def _once(folder: Path, make: Callable[[Path], Path]) -> Path:
    return folder if folder.is_dir() else make(folder)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-layer BERT sentence encoder folder, saved once."""
    return save_tiny_text(tmp_path_factory.mktemp("text") / "hf_text")


@pytest.fixture(scope="session")
def tiny_fusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fusion teacher folder, saved once."""
    return save_tiny_fusion(tmp_path_factory.mktemp("fusion") / "fusion")


def shrink(config: Path, data_root: Path, out: Path, towers: Path, steps: int = 4) -> list[str]:
    """Overrides that turn any experiment into a CPU run of a few steps on tiny models,
    keeping its graph (edges, losses, weights) exactly as written."""
    from omegaconf import OmegaConf

    from distill.config.load import load_raw

    raw = OmegaConf.to_container(load_raw(config))
    overrides = [
        f"output_dir={out}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=2", "optim.warmup_steps=1",
        "data.dataset=synthetic", f"data.args={{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: '{data_root}'}}",
        "data.batch_size=16", "data.eval_batch_size=12", "data.num_workers=0", "data.shuffle_buffer=50",
    ]
    for name, model in (raw.get("models") or {}).items():
        if model is None:
            continue
        if model["type"] in ("towers", "hf_clip"):
            overrides.append(f"models.{name}.type=towers")
            overrides.append(f"models.{name}.args={{path: '{towers}'}}")
        elif model["type"] == "dual_encoder":  # max_length: the tiny towers', so token-level edges align
            overrides += [f"models.{name}.args.image_model=test_resnet", f"models.{name}.args.image_size=32",
                          f"models.{name}.args.max_length=32"]
            overrides += [f"models.{name}.args.text_config.{k}={v}" for k, v in TINY_TEXT.items()]
        elif model["type"] == "hf_text":  # tiny folders next to the towers one, made on first use
            overrides.append(f"models.{name}.args.path='{_once(towers.parent / 'hf_text', save_tiny_text)}'")
        elif model["type"] in ("fusion", "twin") and "path" in (model.get("args") or {}):
            overrides.append(f"models.{name}.args.path='{_once(towers.parent / 'fusion', save_tiny_fusion)}'")
        elif model["type"] in ("fusion", "twin"):
            overrides += [f"models.{name}.args.{k}={v}" for k, v in TINY_FUSION.items()]
        elif model["type"] == "open_clip":  # the real architecture at 64 px; random weights saved locally
            overrides.append(f"models.{name}.args.image_size=64")
            if (model.get("args") or {}).get("pretrained"):
                arch = model["args"]["model"]
                file = save_random_open_clip(towers.parent / "open_clip" / f"{arch}.safetensors", arch)
                overrides.append(f"models.{name}.args.pretrained='{file}'")
    for name in raw.get("save_pretrained") or {}:
        overrides.append(f"save_pretrained.{name}={out / 'saved' / name}")
    return overrides


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """`final.ckpt` of the tiny config fitted once (student: 16 dims, teacher: 24 dims)."""
    from distill.core.check import load_checked
    from distill.training.stages import train

    folder = tmp_path_factory.mktemp("tiny_fit")
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(out=folder / "run", data=data_root))
    train(load_checked(path))
    return folder / "run" / "final.ckpt"
