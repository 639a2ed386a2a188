"""Zero-shot classification: the metrics and class weights against hand-computed values, an
image folder and the embedded tasks end to end through `distill eval --task zeroshot`, the
tables that show it next to RSUM, and bad inputs as one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.commands.cli import main
from distill.config.schema import DataConfig
from distill.data.base import open_rgb
from distill.data.captions import NUMBER_WORDS, vocabulary, words
from distill.data.scenes import SHAPES
from distill.data.synthetic import SyntheticShapes, make_example
from distill.eval import ablation, report
from distill.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    EMBEDDED_TASKS,
    class_weights,
    classification_metrics,
    embedded_task,
    evaluate_zeroshot,
    folder_task,
    zeroshot_weights,
)
from distill.models.tiny import TinyDual
from distill.training.checkpoint import open_target

# ---------------------------------------------------------------- metrics and weights


def test_metrics_match_hand_computed_values() -> None:
    logits = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.5],  # label 0: best -> rank 0, predicted 0
        [0.2, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 0: 5 classes above -> rank 5 (top-5 miss), predicted 1
        [0.5, 0.4, 0.9, 0.1, 0.0, 0.3],  # label 1: 2 above -> rank 2, predicted 2
        [0.1, 0.2, 0.7, 0.7, 0.0, 0.0],  # label 2: tied with class 3 (higher index) -> rank 0, predicted 2
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # label 5: tied with 5 lower indices -> rank 5, predicted 0
    ])  # fmt: skip
    labels = torch.tensor([0, 0, 1, 2, 5])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(40.0)  # images 0 and 3
    assert m["top5"] == pytest.approx(60.0) and m["top5_k"] == 5  # ranks 0, 5, 2, 0, 5
    assert m["per_class_recall"] == [50.0, 0.0, 100.0, None, None, 0.0]
    assert m["mean_per_class_recall"] == pytest.approx((50 + 0 + 100 + 0) / 4)  # classes with images only
    assert m["per_class_images"] == [2, 1, 1, 0, 0, 1]
    assert (m["n_images"], m["n_classes"]) == (5, 6)


def test_top_k_is_capped_at_the_number_of_classes() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.9], [0.9, 0.5, 0.1], [0.2, 0.1, 0.0], [0.0, 0.3, 0.2]])
    m = classification_metrics(logits, torch.tensor([0, 0, 2, 1]))
    assert m["top5_k"] == 3 and m["top5"] == 100.0
    assert m["top1"] == 50.0  # images 1 and 3
    assert m["per_class_recall"] == [50.0, 100.0, 0.0] and m["mean_per_class_recall"] == pytest.approx(50.0)


def test_metrics_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.tensor([[0.0, math.nan]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="expected"):
        classification_metrics(torch.zeros(3), torch.tensor([0, 0, 0]))


def test_class_weights_are_renormalised_means_of_normalised_templates() -> None:
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 5.0, 0.1, 2.0])[None, :, None]
    expected = np.zeros((3, 5))
    for c in range(3):
        v = sum(x[c, t].numpy() / np.linalg.norm(x[c, t].numpy()) for t in range(4)) / 4
        expected[c] = v / np.linalg.norm(v)
    assert np.allclose(zeroshot_weights(x).numpy(), expected, atol=1e-6)
    # not the normalised mean of the raw embeddings: template norms do not weigh in
    assert not np.allclose(torch.nn.functional.normalize(x.mean(1), dim=-1).numpy(), expected, atol=1e-3)


def test_class_weights_encode_every_prompt_of_every_class() -> None:
    torch.manual_seed(0)
    model = TinyDual().eval()
    classes, templates = ["red circle", "blue star"], ["a {c}", "one {c}", "we can see a {c}"]
    with torch.no_grad():
        got = class_weights(model, classes, templates, batch_size=4)  # batches cross the class boundary
        tok = model.text_preprocess()
        one = [[model.encode_text(**tok([t.replace("{c}", c)]))[0] for t in templates] for c in classes]
    expected = torch.stack([torch.nn.functional.normalize(torch.stack(e).mean(0), dim=0) for e in one])
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- an image folder


COLOURS = {"big_cat": (200, 30, 30), "dog": (30, 200, 30), "gold_fish": (30, 30, 200)}


def image_folder(root: Path, per_class: int = 3) -> Path:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            ext = "png" if k % 2 else "jpg"
            Image.new("RGB", (40 + 8 * k, 36), tuple(min(255, v + 10 * k) for v in rgb)).save(root / name / f"{k}.{ext}")
    return root


def test_folder_end_to_end_through_the_cli(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    ckpt = Path(shutil.copy(tiny_checkpoint, run / "final.ckpt"))
    data = image_folder(tmp_path / "pets")
    (data / "dog" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped and counted, never raised
    names = tmp_path / "names.txt"
    names.write_text("big cat\ndog\n\ngoldfish\n")
    assert main(["eval", str(ckpt), "--task", "zeroshot", "--data", str(data), "--classnames", str(names)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "zeroshot_pets.json").read_text())
    assert result["task"] == str(data) and result["model"] == "student"
    assert result["classes"] == ["big cat", "dog", "goldfish"] and result["templates"] == list(DEFAULT_TEMPLATES)
    assert (result["n_classes"], result["n_images"], result["skipped"]) == (3, 9, 1)
    assert result["per_class_images"] == {"big cat": 3, "dog": 3, "goldfish": 3}
    assert result["top5_k"] == 3 and result["top5"] == 100.0
    recalls = list(result["per_class_recall"].values())
    assert result["mean_per_class_recall"] == pytest.approx(sum(recalls) / 3)
    assert result["top1"] == pytest.approx(result["mean_per_class_recall"])  # balanced classes: the same number
    assert all(round(3 * r / 100) == pytest.approx(3 * r / 100) for r in recalls)  # k of 3 images
    assert re.search(r"^top1 +\d+\.\d\d$", printed, re.M) and "goldfish" in printed and "1 unreadable" in printed


def test_folder_result_is_the_direct_computation(tiny_yaml: Path, tmp_path: Path) -> None:
    """Labels stay with their images through the loader: the metrics equal those of encoding
    the files one by one, in an order the loader never sees."""
    data = image_folder(tmp_path / "pets", per_class=4)
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"gold_fish": "goldfish", "big_cat": "lion", "dog": "puppy"}))
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\n\na {c} {in braces}\n")
    task = folder_task(data, classnames=str(mapping), templates=str(templates))
    assert task.classes == ("lion", "puppy", "goldfish") and task.templates == ("a photo of a {c}.", "a {c} {in braces}")
    model = open_target(str(tiny_yaml)).graph.models["student"]
    got = evaluate_zeroshot(model, "student", task, batch_size=5)
    pre = model.image_preprocess()
    files = sorted((p for p in data.rglob("*") if p.is_file()), reverse=True)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(pre(open_rgb(p))[None]) for p in files])
        weights = class_weights(model, task.classes, task.templates)
    labels = torch.tensor([sorted(COLOURS).index(p.parent.name) for p in files])
    want = classification_metrics(emb @ weights.T, labels)
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert got[key] == pytest.approx(want[key])
    assert list(got["per_class_recall"].values()) == pytest.approx(want["per_class_recall"])


# ---------------------------------------------------------------- the embedded tasks


def test_embedded_prompts_speak_the_caption_grammar() -> None:
    known = set(vocabulary())
    for name, spec in EMBEDDED_TASKS.items():
        prompts = [t.replace("{c}", c) for c in spec["names"] for t in spec["templates"]]
        unknown = {w for p in prompts for w in words(p)} - known
        assert not unknown, (name, unknown)
        assert len(spec["keys"]) == len(spec["names"]) == len(set(spec["names"]))


def test_count_labels_are_the_test_scenes_and_match_their_captions(data_root: Path) -> None:
    bench = SyntheticShapes(n_train=48, n_val=12, n_test=12, image_size=32, root=str(data_root))
    bench.prepare()
    task = embedded_task("count", DataConfig(args={"n_train": 48, "n_val": 12, "n_test": 12, "image_size": 32,
                                                   "root": str(data_root)}))  # fmt: skip
    assert len(task.images) == 12 and task.classes[0] == "two"
    on_disk = open_rgb(data_root / "images" / f"{48 + 12:09d}.jpg")  # the test split's first image
    assert np.array_equal(np.asarray(task.images[0]()), np.asarray(on_disk))
    # a larger test split: every "N shapes in total" caption agrees with its scene's label
    task = embedded_task("count", DataConfig(args={"n_test": 400, "image_size": 32}))
    checked = 0
    for i, label in enumerate(task.labels):
        for caption in make_example(seed=0, split="test", index=i, image_size=32)[1]:
            said = re.match(r"(\w+) (?:shape|object|thing)s in total", caption.lower())
            if said:
                assert NUMBER_WORDS.index(said.group(1)) == label + 2, (i, caption)
                checked += 1
    assert checked > 20


def test_single_object_sets_are_balanced_and_deterministic() -> None:
    a, b = embedded_task("shape"), embedded_task("shape", DataConfig(args={"seed": 7}))
    assert a.classes == SHAPES and len(a.images) == 8 * 50
    assert [a.labels.count(c) for c in range(8)] == [50] * 8
    assert np.array_equal(np.asarray(a.images[3]()), np.asarray(b.images[3]()))  # apart from the benchmark seed
    assert embedded_task("colour").images[0]().size == (64, 64)


def test_embedded_tasks_end_to_end_through_the_cli(tiny_yaml: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "out"
    assert main(["eval", str(tiny_yaml), "--task", "zeroshot", "--data", "embedded:shape", "--output", str(out)]) == 0
    shape = json.loads((out / "zeroshot_embedded_shape.json").read_text())
    assert (shape["n_classes"], shape["n_images"], shape["top5_k"]) == (8, 400, 5)
    assert shape["per_class_images"] == dict.fromkeys(SHAPES, 50)
    assert shape["top1"] <= shape["top5"] and "a picture of a {c}" in shape["templates"]
    assert main(["eval", str(tiny_yaml), "--task", "zeroshot", "--data", "embedded:count", "--output", str(out)]) == 0
    count = json.loads((out / "zeroshot_embedded_count.json").read_text())
    assert count["n_images"] == 12 and count["classes"] == list(NUMBER_WORDS[2:])
    assert sum(count["per_class_images"].values()) == 12 and None in count["per_class_recall"].values()
    assert "n/a" in capsys.readouterr().out


# ---------------------------------------------------------------- next to RSUM


def test_report_and_sweep_tables_show_zero_shot_next_to_rsum() -> None:
    metrics = {f"{d}_r{k}": 10.0 for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum": 60.0}
    plain = report.metrics_to_row("teacher", metrics, 1000, 1.0, 1.0)
    with_zs = report.metrics_to_row("student", metrics, 100, 0.5, 0.5, zeroshot={"top1": 42.5, "task": "embedded:shape"})
    assert "Zero-shot" not in report.format_table([plain])
    lines = report.format_table([plain, with_zs]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[head.index("RSUM") + 1] == "Zero-shot top-1 (embedded:shape)"
    assert len(lines[1].strip("|").split("|")) == len(head)
    assert [c.strip() for c in lines[2].strip("|").split("|")][head.index("RSUM") + 1] == "–"
    assert [c.strip() for c in lines[3].strip("|").split("|")][head.index("RSUM") + 1] == "42.50"

    runs = [{"variant": "full", "seed": s, "edges": ["si_st"], **metrics, "ranks": {}, "zeroshot_top1": v,
             "zeroshot_task": "embedded:shape"} for s, v in ((0, 40.0), (1, 50.0))]  # fmt: skip
    table = ablation.format_table(ablation.summarize(runs)).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[head.index("RSUM") + 1] == "zero-shot top-1 (embedded:shape)"
    assert [c.strip() for c in table[2].strip("|").split("|")][head.index("RSUM") + 1] == "45.0 ± 7.1"
    plain_runs = [{k: v for k, v in r.items() if not k.startswith("zeroshot")} for r in runs]
    assert "zero-shot" not in ablation.format_table(ablation.summarize(plain_runs))


# ---------------------------------------------------------------- bad inputs


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task's files are checked before any model loads."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the task's files were checked")

    monkeypatch.setattr("distill.commands.eval.open_target", refuse)


def test_bad_inputs_are_one_line_errors(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        no_weights: None) -> None:  # fmt: skip
    def zeroshot(*args: str) -> str:
        return one_error(capsys, main(["eval", str(tiny_yaml), "--task", "zeroshot", *args]))

    missing = tmp_path / "nowhere"
    assert str(missing) in zeroshot("--data", str(missing)) and "--data" in zeroshot("--data", str(missing))

    empty = image_folder(tmp_path / "empty_class")
    (empty / "zebra").mkdir()
    line = zeroshot("--data", str(empty))
    assert str(empty / "zebra") in line and "no image" in line

    data = image_folder(tmp_path / "pets")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    line = zeroshot("--data", str(data), "--classnames", str(names))
    assert str(names) in line and "2 names for 3" in line
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"big_cat": "cat", "dog": "dog", "goldfish": "fish"}))
    line = zeroshot("--data", str(data), "--classnames", str(mapping))
    assert str(mapping) in line and "'goldfish'" in line and "did you mean 'gold_fish'" in line

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na photo of a {}.\n")
    line = zeroshot("--data", str(data), "--templates", str(templates))
    assert str(templates) in line and "line 2" in line and "'a photo of a {}.'" in line and "{c}" in line
    line = zeroshot("--data", "embedded:shape", "--templates", str(templates))
    assert str(templates) in line and "line 2" in line

    assert "did you mean embedded:shape" in zeroshot("--data", "embedded:shapes")
    assert "--data" in zeroshot()
    assert "--split" in zeroshot("--data", "embedded:count", "--split", "val")
    assert "--data: only for --task zeroshot" in one_error(capsys, main(["eval", str(tiny_yaml), "--data", str(data)]))
