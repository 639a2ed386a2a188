"""The knowledge graph: only needed nodes run, teachers stay frozen, per-edge outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.batch import Batch
from distill.core.build import build_graph, models_to_load
from distill.core.check import load_checked
from distill.core.graph import KnowledgeGraph


def fake_batch(graph: KnowledgeGraph, n: int = 6) -> Batch:
    inputs = {}
    for name in graph.models:
        tok = graph.models[name].text_preprocess()
        text = tok([f"a red circle number {i}" for i in range(n)])
        inputs[name] = {"pixel_values": torch.randn(n, 3, 32, 32), **text}
    return Batch(keys=[str(i) for i in range(n)], image_ids=torch.tensor([0, 0, 1, 2, 3, 4][:n]), inputs=inputs)


def count_calls(graph: KnowledgeGraph) -> dict[str, int]:
    calls = {name: 0 for name in graph.models}
    for name, model in graph.models.items():
        original = model.encode

        def counted(output: str, inputs: dict, _name: str = name, _orig=original) -> torch.Tensor:
            calls[_name] += 1
            return _orig(output, inputs)

        model.encode = counted  # type: ignore[method-assign]
    return calls


def test_forward_returns_total_and_each_enabled_edge(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml))
    out = graph(fake_batch(graph))
    assert set(out) == {"loss", "edge/si_st", "edge/si_tt", "edge/st_ti_kl"}
    expected = sum(graph.edges[k[5:]].weight * v for k, v in out.items() if k.startswith("edge/"))
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    assert all(p.grad is None for p in graph.models["teacher"].parameters())
    assert any(p.grad is not None for p in graph.models["student"].parameters())


def test_teacher_with_all_edges_off_is_never_called(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml))
    calls = count_calls(graph)
    graph.set_enabled({"si_tt": False, "st_ti_kl": False})
    out = graph(fake_batch(graph))
    assert calls["teacher"] == 0 and calls["student"] == 2
    assert set(out) == {"loss", "edge/si_st"}
    graph.set_enabled({"si_tt": True})
    graph(fake_batch(graph))
    assert calls["teacher"] == 1  # only teacher.text is needed


def test_a_teacher_no_enabled_edge_reads_is_not_even_loaded(tiny_yaml: Path) -> None:
    cfg = load_checked(tiny_yaml, ["edges.si_tt.enabled=false", "edges.st_ti_kl.enabled=false"])
    assert models_to_load(cfg) == ["student"]
    assert list(build_graph(cfg).models) == ["student"]


def test_each_node_runs_once_per_step(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml))
    calls = count_calls(graph)
    graph(fake_batch(graph))
    # student.image, student.text, teacher.text, teacher.image: each once although read by 2-3 edges
    assert calls == {"student": 2, "teacher": 2}


def test_teachers_stay_in_eval_mode_and_frozen(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml))
    graph.train()
    assert graph.models["student"].training and not graph.models["teacher"].training
    assert not any(p.requires_grad for p in graph.models["teacher"].parameters())


def test_disabled_edge_parameters_stop_training(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml))
    assert graph.losses["si_st"].logit_scale.requires_grad
    graph.set_enabled({"si_st": False})
    assert not graph.losses["si_st"].logit_scale.requires_grad
    # the projection of si_tt (16 -> 24) exists whether or not the edge is on
    assert graph.losses["si_tt"].proj.weight.shape == (24, 16)


def test_half_precision_teacher(tiny_yaml: Path) -> None:
    graph = build_graph(load_checked(tiny_yaml, ["models.teacher.precision=bf16"]))
    assert next(graph.models["teacher"].parameters()).dtype == torch.bfloat16
    out = graph(fake_batch(graph))
    assert torch.isfinite(out["loss"])
