"""Each layer node equals what its library itself computes: Hugging Face `output_hidden_states`
/ `output_attentions`, timm and open_clip `forward_intermediates`, attention recomputed from
the layer's own q, k and v projections; the final embedding is unchanged by reading layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.models.dual_encoder import DualEncoder
from distill.models.fusion import Fusion
from distill.models.hf_clip import HFClip
from distill.models.hf_text import HFText
from distill.models.twin import Twin
from tests.conftest import TINY_FUSION
from tests.test_models import save_tiny_clip

TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
CAPTIONS = ["a red circle", "two small blue squares to the left of a large green triangle", "green"]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, L, d) queries and keys -> softmax(q k^T / sqrt(d)), padded keys (mask False) out."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(N, L, H d) -> (N, H, L, d)."""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


@pytest.fixture(scope="module")
def vit_student() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(image_model="test_vit", image_size=64, text_config=TEXT, embed_dim=24).eval()


def test_timm_vit_nodes_equal_forward_intermediates_and_its_own_qkv(vit_student: DualEncoder) -> None:
    tower, px = vit_student.image_tower, torch.randn(2, 3, 64, 64)
    fused = tower.blocks[2].attn.fused_attn
    wanted = [("hidden", 0), ("hidden", 2), ("tokens", -1), ("attention", 2), ("values", 2)]
    with torch.no_grad():
        final, got = vit_student.encode_layers("image", {"pixel_values": px}, wanted)
        close(final, vit_student.encode_image(px))
        _, inter = tower.forward_intermediates(px, indices=[0, 1, 2, 5], output_fmt="NLC", return_prefix_tokens=True)
        full = [torch.cat([prefix, spatial], 1) for spatial, prefix in inter]
        close(got[("hidden", 0)].states, full[0])
        close(got[("hidden", 2)].states, full[2])
        close(got[("tokens", -1)].states, inter[3][0])  # the 16 patches, without the class token
        assert got[("tokens", -1)].states.shape[1] == 16 and got[("hidden", 0)].mask.all()
        block = tower.blocks[2]  # its input is block 1's output
        qkv = block.attn.qkv(block.norm1(full[1])).unflatten(-1, (3, -1))
        q, k = (heads(qkv[..., j, :], block.attn.num_heads) for j in range(2))
        close(got[("attention", 2)].states, softmax_attention(block.attn.q_norm(q), block.attn.k_norm(k)))
        close(got[("values", 2)].states, qkv[..., 2, :])
    assert got[("values", 2)].heads == block.attn.num_heads
    assert tower.blocks[2].attn.fused_attn == fused  # the fused kernel again after the read


def test_timm_cnn_stages_equal_forward_intermediates() -> None:
    model = DualEncoder(image_model="test_resnet", image_size=32, text_config=TEXT, embed_dim=24).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, got = model.encode_layers("image", {"pixel_values": px}, [("hidden", 1), ("tokens", 3), ("hidden", -1)])
        maps = model.image_tower.forward_intermediates(px, intermediates_only=True)
        close(final, model.encode_image(px))
    for key, i in ((("hidden", 1), 1), (("tokens", 3), 3), (("hidden", -1), 4)):
        close(got[key].states, maps[i].flatten(2).transpose(1, 2))


def test_hf_text_tower_nodes_equal_output_hidden_states_and_attentions(vit_student: DualEncoder) -> None:
    text = vit_student.text_preprocess()(CAPTIONS)
    tower = vit_student.text_tower
    with torch.no_grad():
        final, got = vit_student.encode_layers("text", text, [("hidden", 0), ("hidden", 1), ("attention", 1),
                                                              ("values", 0)])
        close(final, vit_student.encode_text(**text))
        ref = tower(**text, output_hidden_states=True)
        tower.set_attn_implementation("eager")
        att = tower(**text, output_attentions=True).attentions
        tower.set_attn_implementation("sdpa")
    close(got[("hidden", 0)].states, ref.hidden_states[1])
    close(got[("hidden", 1)].states, ref.hidden_states[2])
    assert torch.equal(got[("hidden", 0)].mask, text["attention_mask"].bool())
    close(got[("attention", 1)].states, att[1])
    close(got[("values", 0)].states, tower.encoder.layer[0].attention.self.value(ref.hidden_states[0]))
    assert got[("attention", 1)].heads == 2 and tower.config._attn_implementation == "sdpa"


def test_a_training_students_attention_rows_stay_distributions() -> None:
    model = DualEncoder(image_model="test_resnet", image_size=32, embed_dim=24,
                        text_config={**TEXT, "attention_probs_dropout_prob": 0.5}).train()
    text = model.text_preprocess()(CAPTIONS)
    _, got = model.encode_layers("text", text, [("attention", 0)])
    rows = got[("attention", 0)].states.sum(-1)  # (N, H, L)
    close(rows, torch.ones_like(rows))  # dropout is off for the read layer's probabilities
    assert model.text_tower.encoder.layer[0].attention.self.training  # and back on afterwards


def test_hf_text_encoder_nodes(tiny_text: Path) -> None:
    model = HFText(path=str(tiny_text)).eval()
    text = model.text_preprocess()(CAPTIONS)
    with torch.no_grad():
        final, got = model.encode_layers("text", text, [("hidden", -1), ("values", 2)])
        ref = model.model(**text, output_hidden_states=True)
        close(final, model.encode_text(**text))
    close(got[("hidden", -1)].states, ref.hidden_states[3])
    close(got[("values", 2)].states, model.model.encoder.layer[2].attention.self.value(ref.hidden_states[2]))


def test_hf_clip_nodes_equal_its_towers_hidden_states_and_attentions(tmp_path: Path) -> None:
    model = HFClip(path=str(save_tiny_clip(tmp_path / "clip"))).eval()
    px, text = torch.randn(2, 3, 32, 32), model.text_preprocess()(CAPTIONS[:2])
    with torch.no_grad():
        final, got = model.encode_layers("image", {"pixel_values": px}, [("hidden", 0), ("tokens", 0), ("attention", 0)])
        close(final, model.encode_image(px))
        vision = model.model.vision_model(pixel_values=px, output_hidden_states=True)
        close(got[("hidden", 0)].states, vision.hidden_states[1])
        close(got[("tokens", 0)].states, vision.hidden_states[1][:, 1:])  # CLIP's class token left out
        final, tgot = model.encode_layers("text", text, [("hidden", 0), ("attention", 0)])
        close(final, model.encode_text(**text))
        model.model.set_attn_implementation("eager")
        ref = model.model.text_model(**text, output_hidden_states=True, output_attentions=True)
        vatt = model.model.vision_model(pixel_values=px, output_attentions=True).attentions
        model.model.set_attn_implementation("sdpa")
    close(got[("attention", 0)].states, vatt[0])
    close(tgot[("hidden", 0)].states, ref.hidden_states[1])
    close(tgot[("attention", 0)].states, ref.attentions[0])  # causal and padded, as the model computes it


def test_open_clip_nodes_equal_forward_intermediates_and_multihead_attention() -> None:
    pytest.importorskip("open_clip")
    from distill.models.openclip import OpenClip
    from tests.test_openclip import TINY_ARCH

    model = OpenClip(model="ViT-B-32", config=TINY_ARCH).eval()
    px, text = torch.randn(2, 3, 32, 32), model.text_preprocess()(CAPTIONS[:2])
    wanted = [("hidden", 0), ("hidden", 1), ("tokens", 1), ("attention", 1), ("values", 1)]
    with torch.no_grad():
        final, got = model.encode_layers("image", {"pixel_values": px}, wanted)
        close(final, model.encode_image(px))
        ref = model.model.forward_intermediates(image=px, image_indices=[0, 1], image_output_fmt="NLC",
                                                image_output_extra_tokens=True)
        for i in (0, 1):
            close(got[("hidden", i)].states, torch.cat([ref["image_intermediates_prefix"][i],
                                                        ref["image_intermediates"][i]], 1))
        close(got[("tokens", 1)].states, ref["image_intermediates"][1])
        block = model.model.visual.transformer.resblocks[1]
        x = block.ln_1(got[("hidden", 0)].states)
        att = block.attn(x, x, x, need_weights=True, average_attn_weights=False)[1]
        close(got[("attention", 1)].states, att)
        d = block.attn.embed_dim
        close(got[("values", 1)].states, F.linear(x, block.attn.in_proj_weight[2 * d:], block.attn.in_proj_bias[2 * d:]))
        final, tgot = model.encode_layers("text", text, [("hidden", 1), ("attention", 0)])
        close(final, model.encode("text", text))
        tref = model.model.forward_intermediates(text=text["input_ids"], text_indices=[1])
        close(tgot[("hidden", 1)].states, tref["text_intermediates"][0])
        assert torch.equal(tgot[("hidden", 1)].mask, text["attention_mask"].bool())
        rows = tgot[("attention", 0)].states
        assert torch.all(rows.triu(1) == 0)  # open_clip's causal text mask, applied by the module itself
    agrees_with_probe(model, OpenClip.layer_outputs(model="ViT-B-32", config=TINY_ARCH),
                      {"image": {"pixel_values": px}, "text": text})


def backbone_states(model: Fusion | Twin, part: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """[CLS] + the part through each block, recomputed by hand."""
    b = model.backbone
    x = torch.cat([b.cls.expand(part[0].shape[0], -1, -1), part[0]], 1)
    mask = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.bool), part[1]], 1)
    states = []
    for block in b.blocks:
        x = block(x, mask)
        states.append(x)
    return states


def test_fusion_and_twin_nodes_equal_their_blocks_and_explicit_attention() -> None:
    torch.manual_seed(0)
    fusion = Fusion(**TINY_FUSION).eval()  # type: ignore[arg-type]
    twin = Twin(**TINY_FUSION).eval()  # type: ignore[arg-type]
    twin.backbone.load_state_dict(fusion.backbone.state_dict())
    text = fusion.text_preprocess()(CAPTIONS)
    with torch.no_grad():
        final, got = fusion.encode_layers("text", text, [("hidden", 1), ("attention", 0), ("values", 1)])
        close(final, fusion.encode_text(**text))  # the explicit attention agrees with the fused kernel
        part = fusion.backbone.embed_text(text["input_ids"], text["attention_mask"])
        states = backbone_states(fusion, part)
        close(got[("hidden", 1)].states, states[1])
        mask = got[("hidden", 1)].mask
        assert torch.equal(mask[:, 1:], text["attention_mask"].bool()) and mask[:, 0].all()  # [CLS] + tokens
        block = fusion.backbone.blocks[0]
        x0 = torch.cat([fusion.backbone.cls.expand(3, -1, -1), part[0]], 1)
        h = block.norm1(x0)
        close(got[("attention", 0)].states, softmax_attention(heads(block.q(h), 2), heads(block.k(h), 2), mask))
        close(got[("values", 1)].states, fusion.backbone.blocks[1].v(fusion.backbone.blocks[1].norm1(states[0])))
        px = torch.randn(3, 3, 32, 32)
        _, image = twin.encode_layers("image", {"pixel_values": px}, [("tokens", -1)])
        _, same = fusion.encode_layers("image", {"pixel_values": px}, [("tokens", -1)])
    close(image[("tokens", -1)].states, same[("tokens", -1)].states)
    assert image[("tokens", -1)].states.shape == (3, 16, 32)
    assert not fusion.backbone.blocks[0].explicit  # the fused kernel again after the read


def agrees_with_probe(model: object, specs: dict, inputs: dict) -> None:
    """Every layer the meta-device probe declares has, at run time, the width, heads and
    positions validation was told (text: at most `positions`)."""
    for output, kinds in specs.items():
        for kind, spec in kinds.items():
            if spec.reason:
                continue
            wanted = [(kind, i) for i in range(spec.count)]
            with torch.no_grad():
                _, got = model.encode_layers(output, inputs[output], wanted)  # type: ignore[attr-defined]
            for (_, i), value in got.items():
                shape, x = spec.shapes[i], value.states
                length = x.shape[-1] if kind == "attention" else x.shape[1]
                assert (x.shape[1] if kind == "attention" else value.heads) == shape.heads, (output, kind, i)
                if kind != "attention":
                    assert x.shape[-1] == shape.width, (output, kind, i)
                assert length <= shape.positions if spec.dynamic else length == shape.positions, (output, kind, i)


def test_what_validation_is_told_matches_the_run(vit_student: DualEncoder, tmp_path: Path, tiny_text: Path) -> None:
    px, text = torch.randn(2, 3, 64, 64), vit_student.text_preprocess()(CAPTIONS)
    args = dict(image_model="test_vit", image_size=64, text_config=TEXT, embed_dim=24)
    agrees_with_probe(vit_student, DualEncoder.layer_outputs(**args), {"image": {"pixel_values": px}, "text": text})
    clip_folder = save_tiny_clip(tmp_path / "clip")
    clip = HFClip(path=str(clip_folder)).eval()
    agrees_with_probe(clip, HFClip.layer_outputs(path=str(clip_folder)),
                      {"image": {"pixel_values": torch.randn(2, 3, 32, 32)}, "text": clip.text_preprocess()(CAPTIONS)})
    fusion = Fusion(**TINY_FUSION).eval()  # type: ignore[arg-type]
    agrees_with_probe(fusion, Fusion.layer_outputs(**TINY_FUSION),
                      {"image": {"pixel_values": torch.randn(2, 3, 32, 32)}, "text": fusion.text_preprocess()(CAPTIONS)})
    minilm = HFText(path=str(tiny_text)).eval()
    agrees_with_probe(minilm, HFText.layer_outputs(path=str(tiny_text)), {"text": minilm.text_preprocess()(CAPTIONS)})
