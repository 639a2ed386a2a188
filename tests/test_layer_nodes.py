"""Layer nodes in configs: names, layer indices and maps checked before weights load; the
graph computes them in the output's own forward pass and only when an enabled edge reads them;
experiments/layerwise.yaml end to end on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.commands.cli import main
from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.models.intermediate import LayerNode, parse_node
from distill.training.module import DistillModule
from distill.training.trainer import make_datamodule
from tests.conftest import shrink, write_yaml
from tests.test_experiments import read_metrics
from tests.test_graph import count_calls, fake_batch

TEXT = "{hidden_size: 32, num_hidden_layers: %d, num_attention_heads: %d, intermediate_size: 64, max_position_embeddings: 64}"


def config(tmp_path: Path, data_root: Path, edges: str, *, student_layers: int = 2, teacher_layers: int = 4,
           teacher_heads: int = 4, image: str = "test_vit", extra: str = "") -> Path:
    """A student and a frozen teacher (timm `image` + tiny BERT towers), the task edge, and `edges`."""
    return write_yaml(tmp_path, "layers.yaml", f"""
        name: layers
        output_dir: {tmp_path / 'run'}
        models:
          student:
            type: dual_encoder
            args: {{image_model: {image}, image_size: 32, embed_dim: 16, text_config: {TEXT % (student_layers, 2)}}}
          teacher:
            type: dual_encoder
            frozen: true
            args: {{image_model: {image}, image_size: 32, embed_dim: 24, text_config: {TEXT % (teacher_layers, teacher_heads)}}}
          tiny:
            type: tiny_dual
            frozen: true
        edges:
          si_st: {{loss: infonce, inputs: [student.image, student.text]}}
        {edges}
        data:
          dataset: synthetic
          args: {{n_train: 48, n_val: 12, n_test: 12, image_size: 32, root: '{data_root}'}}
          batch_size: 16
          num_workers: 0
        {extra}
        """)


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_checked(path, overrides, data=False)
    return e.value.problems


def test_parse_node_names() -> None:
    assert parse_node("student.text.hidden[2]") == LayerNode("student", "text", "hidden", 2)
    assert parse_node("teacher.image.tokens[-1]") == LayerNode("teacher", "image", "tokens", -1)
    assert parse_node("student.text.hidden") == LayerNode("student", "text", "hidden", None)
    assert parse_node("student.text") is None and parse_node("student.text.hidden[x]") is None
    assert LayerNode("a", "text", "values", None).at(3) == "a.text.values[3]"


def test_good_layer_nodes_and_a_uniform_map_validate_and_print(tmp_path: Path, data_root: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, data_root, """
          hid:
            loss: hidden_mse
            inputs: [student.text.hidden, teacher.text.hidden]
            layers: uniform
          att:
            loss: attention_kl
            inputs: ["student.text.attention[-1]", "teacher.text.attention[3]"]
          pairs:
            loss: value_relation
            inputs: [student.text.values, teacher.text.values]
            layers: [[0, 1], [-1, -1]]
          tok:
            loss: hidden_mse
            inputs: ["student.image.tokens[2]", "teacher.image.tokens[-1]"]
        """)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("layers 'uniform': student.text.hidden[0] <- teacher.text.hidden[1], "
            "student.text.hidden[1] <- teacher.text.hidden[3]") in out
    assert "student.text.values[1] <- teacher.text.values[3]" in out  # [-1, -1] normalised
    assert "teacher.text.attention[3]    attention (N, 4 heads, L<=32, L<=32)" in out
    assert "student.image.tokens[2]      tokens    (N, 4, 64)" in out  # test_vit at 32 px: a 2 x 2 grid
    png = tmp_path / "graph.png"
    assert main(["graph", str(path), "-o", str(png)]) == 0 and png.stat().st_size > 10_000


@pytest.mark.parametrize("inputs,extra,want", [
    (["student.text.hiden[1]", "teacher.text.hidden[1]"], "",
     "edges.e.inputs[0]: unknown layer kind 'hiden' in 'student.text.hiden[1]'; did you mean 'hidden'?"),
    (["student.txt.hidden[1]", "teacher.text.hidden[1]"], "",
     "edges.e.inputs[0]: 'student' has no layer outputs for 'txt'; did you mean 'text'? layer outputs: image, text"),
    (["studnet.text.hidden[1]", "teacher.text.hidden[1]"], "",
     "edges.e.inputs[0]: unknown model 'studnet' in node 'studnet.text.hidden[1]'; did you mean 'student'?"),
    (["student.text.hidden[2]", "teacher.text.hidden[1]"], "",
     "edges.e.inputs[0]: layer 2 is out of range: student.text has 2 layers (0..1, or -2..-1)"),
    (["student.text.hidden", "teacher.text.hidden[1]"], "",
     "edges.e.inputs[0]: 'student.text.hidden' needs a layer index (student.text.hidden[0] .. student.text.hidden[1]) "
     "or the edge a layer map"),
    (["student.text.hidden[0]", "teacher.text.hidden"], "layers: uniform",
     "edges.e.inputs[0]: the edge's layer map indexes its inputs; write 'student.text.hidden' without [0]"),
    (["student.text.hidden", "teacher.text.hidden"], "layers: unifrom",
     "edges.e.layers: unknown layer map 'unifrom'; did you mean 'uniform'?"),
    (["teacher.text.hidden", "student.text.hidden"], "layers: uniform",
     "edges.e.layers: 'uniform' gives each of teacher.text's 4 layers one of student.text's, which has only 2"),
    (["student.text.hidden", "teacher.text.hidden"], "layers: [[0, 1], [1]]",
     "edges.e.layers[1]: expected 2 layer indices (one per input), got [1]"),
    (["student.text.hidden", "teacher.text.hidden"], "layers: [[0, 4]]",
     "edges.e.layers[0][1]: layer 4 is out of range: teacher.text has 4 layers (0..3, or -4..-1)"),
    (["student.image.hidden[0]", "tiny.image.hidden[0]"], "",
     "edges.e.inputs[1]: model 'tiny' (tiny_dual) has no layer nodes: it is no stack of layers"),
    (["student.image.hidden[0]", "student.text"], "",
     "edges.e.inputs[1]: slot 'teacher' of loss 'hidden_mse' takes hidden/tokens layer nodes "
     "(<model>.<output>.hidden[<layer>]); 'student.text' is an embedding"),
    (["student.text.hidden", "teacher.text"], "layers: uniform",
     "edges.e.inputs[1]: slot 'teacher' of loss 'hidden_mse' takes hidden/tokens layer nodes"),
])
def test_bad_layer_nodes_and_maps_are_one_line_errors(inputs: list[str], extra: str, want: str, tmp_path: Path,
                                                      data_root: Path) -> None:
    path = config(tmp_path, data_root, f"""
          e:
            loss: hidden_mse
            inputs: {[str(i) for i in inputs]}
            {extra}
        """)
    found = problems(path)
    assert any(p.startswith(want) for p in found), found
    assert all("\n" not in p for p in found)


@pytest.mark.parametrize("loss,inputs,args,want", [
    ("feature", ["student.text.hidden[0]", "teacher.text"], "",
     "edges.e.inputs[0]: slot 'student' of loss 'feature' takes an embedding node; 'student.text.hidden[0]' is a "
     "layer node (token losses read those: attention_kl, hidden_mse, token_feature, value_relation)"),
    ("attention_kl", ["student.text.attention[0]", "teacher.text.hidden[0]"], "",
     "edges.e.inputs[1]: slot 'teacher' of loss 'attention_kl' takes attention nodes "
     "(<model>.<output>.attention[<layer>]); got 'teacher.text.hidden[0]'"),
    ("attention_kl", ["student.image.attention[0]", "teacher.image.attention[0]"], "",
     "edges.e.inputs[0]: 'student.image.attention[0]': timm ResNet level 0 (act1) is a stage without attention "
     "(a CNN): it has no attention; student.image offers hidden, tokens"),
    ("hidden_mse", ["student.image.tokens[1]", "teacher.image.tokens[2]"], "",
     "edges.e.inputs: loss 'hidden_mse' cannot compare these nodes: it compares position by position, and "
     "student.image.tokens[1] has 64 positions, teacher.image.tokens[2] 16"),
    ("hidden_mse", ["student.image.tokens[1]", "teacher.text.hidden[0]"], "",
     "edges.e.inputs: loss 'hidden_mse' cannot compare these nodes: it compares position by position, and "
     "student.image.tokens[1] is image while teacher.text.hidden[0] is text"),
    ("value_relation", ["student.text.values[0]", "teacher.text.values[0]"], "args: {heads: 3}",
     "edges.e.inputs: loss 'value_relation' cannot compare these nodes: student.text.values[0] has 32 value "
     "dimensions, not a multiple of 3 relation heads"),
    ("attention_kl", ["student.text.attention[0]", "teacher.text.attention[0]"], "args: {heads: grup}",
     "edges.e.args.heads: heads must be one of ('group', 'mean'), got 'grup'"),
])
def test_slots_take_only_their_kinds(loss: str, inputs: list[str], args: str, want: str, tmp_path: Path,
                                     data_root: Path) -> None:
    path = config(tmp_path, data_root, f"""
          e:
            loss: {loss}
            inputs: {[str(i) for i in inputs]}
            {args}
        """, image="test_resnet")
    found = problems(path)
    assert any(p.startswith(want) for p in found), found


def test_head_counts_that_do_not_divide_and_different_tokenizers(tmp_path: Path, data_root: Path) -> None:
    path = config(tmp_path, data_root, """
          e:
            loss: attention_kl
            inputs: ["student.text.attention[0]", "teacher.text.attention[0]"]
        """, teacher_heads=1)
    assert problems(path, ["models.teacher.args.text_config.hidden_size=48", "models.teacher.args.text_config.num_attention_heads=3"]) \
        == ["edges.e.inputs: loss 'attention_kl' cannot compare these nodes: heads: group maps 2 student heads and 3 "
            "teacher heads, and neither divides the other; use heads: mean"]
    assert load_checked(path, ["edges.e.args.heads=mean", "models.teacher.args.text_config.hidden_size=48",
                               "models.teacher.args.text_config.num_attention_heads=3"], data=False)
    found = problems(path, ["models.teacher.args.max_length=16"])
    assert len(found) == 1 and "tokenise differently" in found[0] and "|32 vs " in found[0]
    pooled = path.read_text().replace("loss: attention_kl", "loss: token_feature").replace(".attention[", ".hidden[")
    path.write_text(pooled)
    assert load_checked(path, ["models.teacher.args.max_length=16"], data=False)  # pooled: no alignment needed


def test_cached_teacher_layer_nodes_are_refused_and_accumulation_too(tmp_path: Path, data_root: Path) -> None:
    path = config(tmp_path, data_root, """
          e:
            loss: hidden_mse
            inputs: ["student.text.hidden[1]", "teacher.text.hidden[3]"]
        """)
    assert problems(path, ["cache.mode=require"]) == [
        "edges.e.inputs[1]: 'teacher.text.hidden[3]' is a layer node of frozen 'teacher', and layer nodes are never "
        "cached (up to 2 KiB per sample and layer in fp16), so cache.mode=require cannot serve it; use "
        "cache.mode=auto (the teacher then runs live) or never"]
    assert load_checked(path, ["cache.mode=auto"], data=False)
    assert problems(path, ["trainer.accumulate_grad_batches=2"]) == [
        "trainer.accumulate_grad_batches: edge e reads layer nodes, which exact accumulation (GradCache) cannot "
        "cache per micro-batch; raise data.batch_size or add devices"]


def test_a_text_layer_node_preprocesses_only_the_text(tmp_path: Path, data_root: Path) -> None:
    """A model read only at text layers gets its tokenizer in the loader, not its image transform."""
    path = config(tmp_path, data_root, """
          e:
            loss: hidden_mse
            inputs: ["student.text.hidden[1]", "teacher.text.hidden[3]"]
        """)
    cfg = load_checked(path, ["cache.mode=never"], data=False)
    collator = make_datamodule(cfg, DistillModule(cfg)).train_collator
    image_models = {m for _, models in collator.image_groups.values() for m in models}
    text_models = {m for _, models in collator.text_groups.values() for m in models}
    assert image_models == {"student"} and text_models == {"student", "teacher"}


def test_a_pair_node_has_no_layers(tmp_path: Path, data_root: Path, tiny_fusion: Path) -> None:
    path = config(tmp_path, data_root, """
          e:
            loss: hidden_mse
            inputs: ["student.image.hidden[0]", "fused.pair.hidden[0]"]
        """)
    text = path.read_text().replace("  tiny:\n", f"  fused:\n    type: fusion\n    frozen: true\n    args: {{path: '{tiny_fusion}'}}\n  tiny:\n")
    path.write_text(text)
    found = problems(path)
    assert any(p.startswith("edges.e.inputs[1]: 'fused' has no layer outputs for 'pair': a pair's states exist per "
                            "scored pair, not per batch row; layer outputs: image, text") for p in found), found


def layer_graph(tmp_path: Path, data_root: Path, enabled: bool = True):  # noqa: ANN201 - a KnowledgeGraph
    path = config(tmp_path, data_root, f"""
          hid:
            loss: hidden_mse
            enabled: {str(enabled).lower()}
            inputs: [student.text.hidden, teacher.text.hidden]
            layers: uniform
          att:
            loss: attention_kl
            enabled: {str(enabled).lower()}
            inputs: ["student.text.attention[1]", "teacher.text.attention[3]"]
          tt:
            loss: infonce
            inputs: [student.text, teacher.text]
        """)
    return build_graph(load_checked(path, data=False))


def test_layer_nodes_come_from_the_outputs_own_forward_pass(tmp_path: Path, data_root: Path) -> None:
    graph = layer_graph(tmp_path, data_root)
    calls = count_calls(graph)
    assert graph.needed_nodes() == ["student.image", "student.text", "student.text.hidden[0]",
                                    "teacher.text.hidden[1]", "student.text.hidden[1]", "teacher.text.hidden[3]",
                                    "student.text.attention[1]", "teacher.text.attention[3]", "teacher.text"]
    out = graph(fake_batch(graph))
    assert calls == {"student": 2, "teacher": 1}  # image + text; text alone (its 3 layer nodes in the same pass)
    assert set(out) == {"loss", "edge/si_st", "edge/hid", "edge/att", "edge/tt"}
    assert all(math.isfinite(float(v.detach())) for v in out.values())
    out["loss"].backward()
    layer0 = graph.models["student"].text_tower.encoder.layer[0]
    assert layer0.attention.self.value.weight.grad is not None
    teacher = graph.models["teacher"].text_tower
    assert teacher.config._attn_implementation != "eager"  # switched back after the pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in graph.modules())


def test_a_model_no_edge_reads_at_a_layer_runs_no_extra_work(tmp_path: Path, data_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    graph = layer_graph(tmp_path, data_root, enabled=False)
    registered: list[str] = []
    original = torch.nn.Module.register_forward_hook

    def counting(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        registered.append(type(self).__name__)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", counting)
    for name in graph.models:
        monkeypatch.setattr(graph.models[name], "encode_layers", lambda *a, **k: pytest.fail("layers computed"))
    graph(fake_batch(graph))
    assert registered == []  # no hook at all, no layer output kept
    graph.set_enabled({"hid": True})
    monkeypatch.undo()
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", counting)
    graph(fake_batch(graph))
    assert registered == ["BertLayer"] * 4  # the four layers of the map, nothing else


def test_fit_layerwise_end_to_end(data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    exp = Path("experiments/layerwise.yaml")
    out = tmp_path / "run"
    args = shrink(exp, data_root, out, tiny_towers)
    cfg = load_checked(exp, args)
    layer_edges = ["st_tt_hidden", "st_tt_attention", "st_tt_values", "si_ti_tokens"]
    assert all(cfg.edges[e].enabled for e in layer_edges)
    assert main(["fit", str(exp), *args]) == 0
    rows = read_metrics(out)
    for edge in layer_edges:
        values = [float(r[f"train/edge/{edge}"]) for r in rows if r.get(f"train/edge/{edge}")]
        assert values and all(math.isfinite(v) for v in values), edge
    assert (out / "final.ckpt").is_file() and (out / "metrics.json").is_file()
