"""Teachers and students from real checkpoint formats: MiniLM offline, SigLIP, first-k-layer
text students, several teachers in one graph (ensemble loss)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.commands.cli import main
from distill.core.check import load_checked
from distill.errors import ConfigError
from distill.losses.base import EdgeContext
from distill.models._hf import DEFAULT_TOKENIZER
from distill.models.dual_encoder import DualEncoder
from distill.models.hf_clip import HFClip
from distill.models.hf_text import MINILM, HFText, resolve_path
from distill.registry import LOSSES
from tests.conftest import TINY, shrink, write_yaml

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar.",
    "A red circle to the left of a blue square.",
    "A blue square is on the right of a red circle.",
    "The stock market fell sharply this morning.",
    "Bananas are rich in potassium.",
]


@pytest.fixture(scope="module")
def minilm() -> HFText:
    return HFText().eval()


def test_minilm_loads_offline_from_the_installed_wheel(minilm: HFText) -> None:
    folder = Path(resolve_path(MINILM))
    assert (folder / "model.safetensors").is_file() and "site-packages" in str(folder)
    assert HFText.describe() == {"text": 384}
    assert minilm.pooling == "mean" and minilm.model.config.num_hidden_layers == 6
    assert HFText.outputs == ("text",) and minilm.image_preprocess() is None


def test_minilm_real_sentences_paraphrases_are_closer(minilm: HFText) -> None:
    with torch.no_grad():
        emb = minilm.encode_text(**minilm.text_preprocess()(SENTENCES))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)))
    sim = emb @ emb.t()
    for a, b in ((0, 1), (2, 3)):  # each paraphrase pair beats every unrelated pairing
        others = [sim[a, j] for j in range(len(SENTENCES)) if j not in (a, b)]
        assert sim[a, b] > 0.6 and all(sim[a, b] > o + 0.3 for o in others)


def test_minilm_matches_sentence_transformers(minilm: HFText) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(resolve_path(MINILM), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    with torch.no_grad():
        ours = minilm.encode_text(**minilm.text_preprocess()(SENTENCES))
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-5, rtol=1e-4)


def test_hf_text_errors_name_the_path(tmp_path: Path, tiny_towers: Path) -> None:
    with pytest.raises(ConfigError, match="'package:no_such_pkg_x': Python package 'no_such_pkg_x' is not installed"):
        HFText.describe(path="package:no_such_pkg_x")
    with pytest.raises(ConfigError, match="text model folder '/no/such/minilm' does not exist"):
        HFText.describe(path="/no/such/minilm")
    with pytest.raises(ConfigError, match="cannot load text model 'someone/not-cached-minilm'.*use a local folder"):
        HFText.describe(path="someone/not-cached-minilm")
    with pytest.raises(ConfigError, match=f"cannot load text model '{tiny_towers}'"):
        HFText.describe(path=str(tiny_towers))  # a towers folder is not a text encoder folder
    with pytest.raises(ConfigError, match="text_layers=9 but the text model has 6 layers"):
        HFText.describe(text_layers=9)


def test_config_error_starts_with_the_yaml_path(tmp_path: Path, data_root: Path) -> None:
    cfg = TINY.format(out=tmp_path, data=data_root).replace("models:\n", """models:
  minilm:
    type: hf_text
    frozen: true
    args: {path: /no/such/dir}
""", 1).replace("edges:\n", """edges:
  st_mt:
    loss: similarity_kl
    inputs: [student.text, student.text, minilm.text, minilm.text]
""", 1)
    with pytest.raises(ConfigError) as e:
        load_checked(write_yaml(tmp_path, "c.yaml", cfg))
    assert e.value.problems == ["models.minilm.args: text model folder '/no/such/dir' does not exist"]
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2


def test_hf_text_first_k_layers_equal_the_teachers(tiny_text: Path) -> None:
    teacher, student = HFText(path=str(tiny_text)).eval(), HFText(path=str(tiny_text), text_layers=2).eval()
    assert student.model.config.num_hidden_layers == 2 and len(student.model.encoder.layer) == 2
    for i in range(2):
        for (k, a), (_, b) in zip(student.model.encoder.layer[i].state_dict().items(),
                                  teacher.model.encoder.layer[i].state_dict().items()):
            assert torch.equal(a, b), k
    text = teacher.text_preprocess()(["a red circle", "two blue squares left of a star"])
    with torch.no_grad():
        hidden = teacher.model(**text, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(student.model(**text).last_hidden_state, hidden)
    picked = HFText(path=str(tiny_text), text_layers=[0, 2])
    assert torch.equal(picked.model.encoder.layer[1].output.dense.weight, teacher.model.encoder.layer[2].output.dense.weight)


def test_dual_encoder_text_student_from_the_first_k_teacher_layers(tmp_path: Path, tiny_text: Path) -> None:
    teacher = HFText(path=str(tiny_text))
    student = DualEncoder(image_model="test_resnet", image_size=32, embed_dim=16, text_model=str(tiny_text), text_layers=2)
    for key, value in student.text_tower.state_dict().items():
        assert torch.equal(value, teacher.model.state_dict()[key]), key  # layers 0, 1 keep their names
    folder = student.save_pretrained(tmp_path / "towers")  # the 2-layer tower reloads as 2 layers
    from distill.models.dual_encoder import Towers

    assert len(Towers(path=str(folder)).text_tower.encoder.layer) == 2
    with pytest.raises(ConfigError, match="text_layers=4 but the text model has 3 layers"):
        DualEncoder.describe(image_model="test_resnet", text_model=str(tiny_text), text_layers=4)


def save_tiny_siglip(folder: Path) -> Path:
    from transformers import BertTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = BertTokenizerFast.from_pretrained(DEFAULT_TOKENIZER)
    config = SiglipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 24},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    SiglipModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_siglip_through_hf_clip_equals_the_users_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, SiglipModel

    folder = save_tiny_siglip(tmp_path / "siglip")
    assert HFClip.describe(path=str(folder)) == {"image": 32, "text": 32}
    teacher = HFClip(path=str(folder)).eval()
    assert teacher.image_preprocess().size == 32 and teacher.max_length == 24
    user = SiglipModel.from_pretrained(str(folder)).eval()  # what a user would write
    text = AutoTokenizer.from_pretrained(str(folder))(["a red circle", "a blue star"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = torch.nn.functional.normalize(user.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = user.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        torch.testing.assert_close(teacher.encode_image(pixels), img)
        torch.testing.assert_close(teacher.encode_text(text["input_ids"], text["attention_mask"]),
                                   torch.nn.functional.normalize(txt.pooler_output, dim=-1))


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_ensemble(a1, a2, teachers, taus, weights, tau_s, columns):  # noqa: ANN001, ANN201
    """Independent reference: plain-Python lists and loops."""
    def sim(x, y, tau):  # noqa: ANN001, ANN202
        return [[sum(p * q for p, q in zip(u, v)) / tau for v in y] for u in x]

    def transpose(m):  # noqa: ANN001, ANN202
        return [list(r) for r in zip(*m)]

    def kl(targets, logits):  # noqa: ANN001, ANN202
        total = 0.0
        for p_row, l_row in zip(targets, logits):
            q = softmax(l_row)
            total += sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(p_row, q) if p > 0)
        return total / len(targets)

    s = sim(a1, a2, tau_s)
    ts = [sim(x, y, tau) for (x, y), tau in zip(teachers, taus)]
    w = [v / sum(weights) for v in weights]

    def mix(mats):  # noqa: ANN001, ANN202
        probs = [[softmax(r) for r in m] for m in mats]
        return [[sum(w[k] * probs[k][i][j] for k in range(len(mats))) for j in range(len(mats[0][0]))]
                for i in range(len(mats[0]))]

    loss = kl(mix(ts), s)
    if columns:
        loss = 0.5 * (loss + kl(mix([transpose(t) for t in ts]), transpose(s)))
    return loss


@pytest.mark.parametrize("columns", [False, True])
def test_ensemble_loss_matches_an_independent_formula(columns: bool) -> None:
    g = torch.Generator().manual_seed(3)
    unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    a1, a2, t1a, t1b, t2a, t2b = unit(5, 4), unit(5, 4), unit(5, 6), unit(5, 6), unit(5, 3), unit(5, 3)
    args = {"student_temperature": 0.1, "teacher_temperatures": [0.05, 0.2], "teacher_weights": [3.0, 1.0], "columns": columns}
    loss = LOSSES.get("similarity_kl_ensemble")(**args)
    assert loss.dim_problem({"student_a": 4, "student_b": 4, "teacher1_a": 6, "teacher1_b": 6,
                             "teacher2_a": 3, "teacher2_b": 3}) is None
    got = loss(a1, a2, t1a, t1b, t2a, t2b, ctx=EdgeContext(image_ids=torch.arange(5))).item()
    lists = lambda x: x.double().tolist()  # noqa: E731
    want = ref_ensemble(lists(a1), lists(a2), [(lists(t1a), lists(t1b)), (lists(t2a), lists(t2b))],
                        [0.05, 0.2], [3.0, 1.0], 0.1, columns)
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(ValueError, match="one value per teacher"):
        LOSSES.get("similarity_kl_ensemble")(teacher_temperatures=[0.05])


def test_ensemble_of_one_teacher_twice_is_similarity_kl() -> None:
    g = torch.Generator().manual_seed(4)
    a, b, t = (torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1) for _ in range(3))
    ctx = EdgeContext(image_ids=torch.arange(6))
    ens = LOSSES.get("similarity_kl_ensemble")(student_temperature=0.1, teacher_temperatures=[0.07, 0.07])
    single = LOSSES.get("similarity_kl")(student_temperature=0.1, teacher_temperature=0.07)
    torch.testing.assert_close(ens(a, b, t, t, t, t, ctx=ctx), single(a, b, t, t, ctx=ctx))


def test_multi_teacher_validates_with_both_teachers(data_root: Path, tiny_towers: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    exp = Path(__file__).parent.parent / "experiments" / "multi_teacher.yaml"
    assert main(["validate", str(exp), *shrink(exp, data_root, tmp_path, tiny_towers)]) == 0
    out = capsys.readouterr().out
    assert "teacher      towers" in out and "minilm       hf_text" in out and "minilm.text" in out
    assert "st_st_ens      similarity_kl_ensemble" in out
    # unshrunk, the MiniLM teacher is the real 384-wide one from the installed wheel
    cfg = load_checked(exp, shrink(exp, data_root, tmp_path, tiny_towers) + [f"models.minilm.args.path={MINILM}"])
    assert cfg.models["minilm"].args["path"] == MINILM


@pytest.mark.parametrize("override,message", [
    ("models.teacher.args.path=/no/towers", "models.teacher.args: towers folder '/no/towers' does not exist"),
    ("models.minilm.args.path=/no/minilm", "models.minilm.args: text model folder '/no/minilm' does not exist"),
    ("models.minilm.args.path=nobody/minilm-x", "models.minilm.args: cannot load text model 'nobody/minilm-x' "
                                                "(no download happens offline: use a local folder)"),
])
def test_missing_checkpoints_fail_validation_with_the_yaml_path(override: str, message: str, data_root: Path,
                                                                tiny_towers: Path, tmp_path: Path) -> None:
    exp = Path(__file__).parent.parent / "experiments" / "multi_teacher.yaml"
    with pytest.raises(ConfigError) as e:
        load_checked(exp, shrink(exp, data_root, tmp_path, tiny_towers) + [override])
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message)
