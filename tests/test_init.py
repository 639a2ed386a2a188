"""Weight inheritance (`init:`), verified tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.models.dual_encoder import DualEncoder
from distill.models.fusion import Fusion
from distill.models.inherit import inherit, pick_layers
from distill.models.twin import Twin
from tests.conftest import TINY_FUSION, write_yaml

TEXT = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}


def dual(layers: int, width: int = 32, embed_dim: int = 24) -> DualEncoder:
    text = {**TEXT, "num_hidden_layers": layers, "hidden_size": width, "intermediate_size": 2 * width}
    return DualEncoder(image_model="test_resnet", image_size=32, embed_dim=embed_dim, text_config=text)


def test_pick_layers() -> None:
    assert pick_layers(12, 4, "uniform") == [0, 4, 7, 11]
    assert pick_layers(6, 3, "uniform") == [0, 2, 5] and pick_layers(6, 1, "uniform") == [5]
    assert pick_layers(6, 2, "first") == [0, 1] and pick_layers(6, 2, "last") == [4, 5]
    assert pick_layers(6, 2, [1, -1]) == [1, 5]
    for n_student, pick, msg in ((2, [0], "lists 1 layers for a stack of 2"), (7, "first", "cannot pick 7"),
                                 (2, [0, 9], "out of range"), (2, "middle", "pick must be one of")):
        with pytest.raises(ValueError, match=msg):
            pick_layers(6, n_student, pick)


def test_layers_embeddings_and_projections_tensor_by_tensor() -> None:
    teacher, student = dual(layers=3), dual(layers=2)
    written = inherit(student, teacher, tensors={"text_tower.embeddings": "text_tower.embeddings", "text_proj": "text_proj"},
                      layers={"text_tower.encoder.layer": {"from": "text_tower.encoder.layer", "pick": [0, 2]}})
    t_state, s_state = teacher.state_dict(), student.state_dict()
    expected = {}
    for key in s_state:
        if key.startswith(("text_tower.embeddings.", "text_proj.")):
            expected[key] = key
        elif key.startswith("text_tower.encoder.layer."):
            i, rest = key.split(".", 4)[3], key.split(".", 4)[4]
            expected[key] = f"text_tower.encoder.layer.{[0, 2][int(i)]}.{rest}"
    assert sorted(written) == sorted(expected)
    for s_key, t_key in expected.items():
        assert torch.equal(s_state[s_key], t_state[t_key]), (s_key, t_key)
    untouched = [k for k in s_state if k.startswith("image_proj.")]
    assert untouched and not any(torch.equal(s_state[k], t_state[k]) for k in untouched if s_state[k].numel() > 1)


def test_width_slicing_copies_the_leading_block() -> None:
    teacher, student = dual(layers=1, width=32, embed_dim=24), dual(layers=1, width=16, embed_dim=12)
    inherit(student, teacher, tensors={"text_tower": "text_tower", "text_proj": "text_proj"}, slice=True)
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(("text_tower.", "text_proj.")):
            source = t_state[key]
            assert torch.equal(value, source[tuple(slice(0, d) for d in value.shape)]), key
    w = student.text_proj.weight
    assert w.shape == (12, 16) and torch.equal(w, teacher.text_proj.weight[:12, :16])


def test_shape_mismatch_names_both_tensors() -> None:
    teacher, student = dual(layers=1, width=32, embed_dim=24), dual(layers=1, width=32, embed_dim=12)
    with pytest.raises(ConfigError) as e:
        inherit(student, teacher, tensors={"text_proj": "text_proj"}, names=("student", "teacher"), where="models.student.init")
    assert e.value.problems[0] == (
        "models.student.init: shape mismatch: student.text_proj.weight (12, 32) vs teacher.text_proj.weight (24, 32) "
        "(set slice: true to copy the leading block of a wider teacher tensor)")
    assert len(e.value.problems) == 2  # weight and bias, reported together
    with pytest.raises(ConfigError, match=r"cannot slice teacher.text_proj.weight \(12, 32\) to student.text_proj.weight \(24, 32\)"):
        inherit(teacher, student, tensors={"text_proj": "text_proj"}, slice=True)
    with pytest.raises(ConfigError, match="teacher.text_tower.nope.word_embeddings.weight does not exist"):
        inherit(student, teacher, tensors={"text_tower.embeddings": "text_tower.nope"})
    with pytest.raises(ConfigError, match="no student tensor under 'text_towr'"):
        inherit(student, teacher, tensors={"text_towr": "text_tower"})


def test_twin_from_a_fusion_folder_and_by_init(tmp_path: Path, tiny_fusion: Path) -> None:
    fused = Fusion(path=str(tiny_fusion))
    twin = Twin(path=str(tiny_fusion))
    for key, value in twin.backbone.state_dict().items():
        assert torch.equal(value, fused.backbone.state_dict()[key]), key
    fresh = Twin(**TINY_FUSION)  # type: ignore[arg-type]
    written = inherit(fresh, fused, tensors={"backbone": "backbone"})
    assert len(written) == len(fresh.state_dict())
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key
    pixels = torch.randn(2, 3, 32, 32)
    emb = fresh.encode_image(pixels)
    assert emb.shape == (2, TINY_FUSION["width"]) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(twin.encode_image(pixels), fused.encode_image(pixels))  # starts equal
    twin.save_pretrained(tmp_path / "twin")
    with pytest.raises(ConfigError, match="holds a 'twin' model, not fusion"):
        Fusion.describe(path=str(tmp_path / "twin"))


INIT_YAML = """
name: init
output_dir: {out}
models:
  student:
    type: dual_encoder
    args:
      image_model: test_resnet
      image_size: 32
      embed_dim: 24
      text_config: {{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
                    intermediate_size: 64, max_position_embeddings: 64}}
    init:
      from: teacher
      tensors: {{text_tower.embeddings: text_tower.embeddings, text_proj: text_proj, image_tower: image_tower}}
      layers: {{text_tower.encoder.layer: text_tower.encoder.layer}}
  teacher:
    type: towers
    frozen: true
    args: {{path: '{towers}'}}
edges:
  si_st:
    loss: infonce
    inputs: [student.image, student.text]
data:
  dataset: synthetic
  args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: {data}}}
"""


def test_init_from_the_config_runs_after_loading(tmp_path: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    towers = dual(layers=3).save_pretrained(tmp_path_factory.mktemp("t3") / "towers")
    cfg = load_checked(write_yaml(tmp_path, "c.yaml", INIT_YAML.format(out=tmp_path, towers=towers, data=data_root)))
    graph = build_graph(cfg)
    assert list(graph.models) == ["student"]  # the teacher served only as a source: not kept
    from distill.models.dual_encoder import Towers

    teacher, student = Towers(path=str(towers)).state_dict(), graph.models["student"].state_dict()
    for key, value in student.items():
        if key.startswith("text_tower.encoder.layer."):
            i, rest = key.split(".", 4)[3], key.split(".", 4)[4]
            assert torch.equal(value, teacher[f"text_tower.encoder.layer.{[0, 2][int(i)]}.{rest}"]), key
        elif key.startswith(("text_tower.embeddings.", "text_proj.", "image_tower.")):
            assert torch.equal(value, teacher[key]), key


def test_init_config_problems_are_reported_before_loading(tmp_path: Path, data_root: Path) -> None:
    text = INIT_YAML.format(out=tmp_path, towers="/no/such/towers", data=data_root)
    text = text.replace("from: teacher", "from: techer\n      slize: true")
    with pytest.raises(ConfigError) as e:
        load_checked(write_yaml(tmp_path, "c.yaml", text))
    problems = [p for p in e.value.problems if ".init" in p]
    assert problems == [
        "models.student.init.slize: unknown key (allowed: from, tensors, layers, slice)",
        "models.student.init.from: 'techer' is not another model of this config (models: teacher)",
    ]
    cyclic = INIT_YAML.format(out=tmp_path, towers="/x", data=data_root).replace(
        "    frozen: true\n", "    frozen: true\n    init: {from: student, tensors: {text_proj: text_proj}}\n")
    with pytest.raises(ConfigError, match=r"models.student.init.from: inheritance cycle student -> teacher -> student"):
        load_checked(write_yaml(tmp_path, "cyc.yaml", cyclic))
