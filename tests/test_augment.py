"""Training augmentation: views that replay exactly, shown to every model at its own size,
and the teacher cache of V views per image."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from distill.augment import AugmentSpec, View, crop_box, draw_view, pick_view
from distill.core.check import load_checked
from distill.data.loading import Collator
from distill.errors import ConfigError
from distill.models.base import ImagePreprocess
from distill.training.cache.build import fill_cache
from distill.training.cache.fingerprint import load_frozen
from distill.training.cache.store import find_entry, resolve_cache
from distill.training.module import DistillModule
from distill.training.trainer import make_datamodule

SPEC = AugmentSpec(scale=(0.3, 1.0), views=4, seed=7)
AUGMENT = ["data.augment.enabled=true", "data.augment.views=3", "data.augment.scale=[0.3,1.0]"]


def noise(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def view_pixels(key: str, view: int) -> bytes:
    """What a worker process computes for (key, view): the parameters and a model's pixels."""
    v = draw_view(SPEC, key, view, 70, 50)
    return repr(v).encode() + ImagePreprocess(size=16).view_array(noise(3), v).tobytes()


def test_a_view_is_the_same_in_another_process_and_epoch() -> None:
    here = [view_pixels(f"img{i}", v) for i in range(3) for v in range(4)]
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: no shared RNG state
        there = pool.starmap(view_pixels, [(f"img{i}", v) for i in range(3) for v in range(4)])
    assert here == there
    assert len(set(here)) == len(here)  # views of one image differ, and images differ
    picks = {e: pick_view(SPEC, 0, e, "img0/1") for e in range(40)}
    assert set(picks.values()) == set(range(4))  # every cached view gets used over epochs
    assert picks == {e: pick_view(SPEC, 0, e, "img0/1") for e in range(40)}  # and replays
    fresh = AugmentSpec(scale=(0.3, 1.0), views=None)
    assert len({pick_view(fresh, 0, e, "img0/1") for e in range(40)}) == 40  # null: a new view every epoch


def test_crops_follow_random_resized_crop() -> None:
    boxes = [crop_box(__import__("random").Random(i), 70, 50, (0.3, 1.0), (3 / 4, 4 / 3)) for i in range(300)]
    areas = [h * w / 3500 for _, _, h, w in boxes]
    ratios = [w / h for _, _, h, w in boxes]
    assert 0.28 <= min(areas) and max(areas) <= 1.0 and max(areas) - min(areas) > 0.5
    assert 3 / 4 * 0.95 <= min(ratios) and max(ratios) <= 4 / 3 * 1.05
    assert all(0 <= t <= 50 - h and 0 <= left <= 70 - w for t, left, h, w in boxes)
    # when ten tries cannot fit the ratio, the whole image clamped to it: torchvision's fallback
    ours = crop_box(__import__("random").Random(0), 60, 60, (1.0, 1.0), (2.0, 2.0))
    theirs = RandomResizedCrop.get_params(torch.zeros(3, 60, 60), [1.0, 1.0], [2.0, 2.0])
    assert ours == tuple(theirs)


def test_every_model_sees_the_same_region_at_its_own_size() -> None:
    image = Image.new("RGB", (100, 60), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 100, 60))  # left half red, right half blue
    collator = Collator({"teacher": (ImagePreprocess(size=32), None), "student": (ImagePreprocess(size=16), None)},
                        SPEC)
    view = View(top=0, left=20, height=60, width=60)  # 30 red columns then 30 blue

    def red_fraction(pixels: torch.Tensor) -> float:
        return float((pixels[0] > pixels[2]).float().mean())

    import distill.data.loading as loading
    original = loading.draw_view
    loading.draw_view = lambda *a: view  # type: ignore[assignment]
    try:
        out = collator.views([image], ["k"], [0])
    finally:
        loading.draw_view = original  # type: ignore[assignment]
    teacher, student = out["teacher"]["pixel_values"][0], out["student"]["pixel_values"][0]
    assert teacher.shape[-1] == 32 and student.shape[-1] == 16
    assert red_fraction(teacher) == pytest.approx(0.5, abs=1 / 16) and red_fraction(student) == pytest.approx(0.5, abs=1 / 8)


def test_flips_and_jitter_only_when_switched_on_and_eval_never_augments() -> None:
    plain = [draw_view(SPEC, f"k{i}", 0, 70, 50) for i in range(60)]
    assert not any(v.flip for v in plain) and all(v.brightness == v.saturation == 1.0 and v.hue == 0 for v in plain)
    rich = AugmentSpec(hflip=True, color_jitter=0.4, hue=0.1, views=2)
    views = [draw_view(rich, f"k{i}", 0, 70, 50) for i in range(60)]
    assert 15 < sum(v.flip for v in views) < 45
    assert all(0.6 <= v.contrast <= 1.4 and -0.1 <= v.hue <= 0.1 for v in views) and len({v.contrast for v in views}) > 50
    pre = {"m": (ImagePreprocess(size=16), None)}
    items = [(0, noise(1), ["a"]), (1, noise(2), ["b"])]
    augmented, plain_eval = Collator(pre, rich).eval_batch(items), Collator(pre).eval_batch(items)
    assert torch.equal(augmented.image_inputs["m"]["pixel_values"], plain_eval.image_inputs["m"]["pixel_values"])


def test_bad_settings_are_one_line_errors_naming_them(tiny_yaml: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_checked(tiny_yaml, ["data.augment.enabled=true", "data.augment.scale=[0.5,1.5]",
                                 "data.augment.ratio=[2,1]", "data.augment.views=0", "data.augment.hue=0.9"])
    assert [p.split(":")[0] for p in e.value.problems] == [
        "data.augment.scale", "data.augment.ratio", "data.augment.hue", "data.augment.views"]
    with pytest.raises(ConfigError, match=r"data.augment.flip"):
        load_checked(tiny_yaml, ["data.augment.flip=true"])  # a typo of hflip: the schema names it


def test_training_batches_show_their_view_and_the_cache_serves_it(tiny_yaml: Path, tmp_path: Path) -> None:
    cache = [f"cache.dir={tmp_path / 'cache'}"]
    config = load_checked(tiny_yaml, [*AUGMENT, *cache])
    fill_cache(config)
    live_config = load_checked(tiny_yaml, [*AUGMENT, *cache, "cache.mode=never"])
    live = make_datamodule(live_config, DistillModule(live_config))
    live.setup("fit")
    batch = next(iter(live.train_dataloader()))
    assert batch.views is not None and set(batch.views.tolist()) <= {0, 1, 2}
    teacher = load_frozen(config, "teacher")
    with torch.no_grad():
        expected = teacher.encode("image", {"pixel_values": batch.inputs["teacher"]["pixel_values"]})
    node = resolve_cache(load_checked(tiny_yaml, [*AUGMENT, *cache, "cache.mode=require"]))["teacher.image"]
    torch.testing.assert_close(node(batch), expected, atol=2e-3, rtol=0)  # fp16 storage
    other = batch.views.clone()
    batch.views = (other + 1) % 3  # another view's row is another embedding
    assert not torch.allclose(node(batch), expected, atol=2e-2)


def test_a_changed_setting_or_view_count_is_a_miss_naming_it(tiny_yaml: Path, tmp_path: Path) -> None:
    cache = [f"cache.dir={tmp_path / 'cache'}"]
    fill_cache(load_checked(tiny_yaml, [*AUGMENT, *cache]))

    def why(*overrides: str) -> str:
        config = load_checked(tiny_yaml, [*cache, *overrides])
        folder, reason = find_entry(config, "teacher", load_frozen(config, "teacher"), ["image", "text"])
        assert folder is None
        return reason

    assert "data.augment.views (3 in the cache, 4 now)" in why(*AUGMENT, "data.augment.views=4")
    assert "data.augment.scale ([0.3, 1.0] in the cache, [0.5, 1.0] now)" in why(*AUGMENT, "data.augment.scale=[0.5,1.0]")
    assert "data.augment (augmented views in the cache, no augmentation now)" in why()
    with pytest.raises(ConfigError, match=r"^data.augment.views: null draws a fresh view every epoch"):
        fill_cache(load_checked(tiny_yaml, [*cache, "data.augment.enabled=true"]))


def test_ranks_encode_their_share_of_the_views_and_merge_to_the_single_process_entry(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    import numpy as np

    from distill.training.cache.build import encode_part, merge_parts
    from distill.training.cache.store import entries

    config = load_checked(tiny_yaml, [*AUGMENT, f"cache.dir={tmp_path / 'cache'}"])
    fill_cache(config)
    (single,) = entries(tmp_path / "cache")
    model = load_frozen(config, "teacher")
    for rank in range(2):  # what two DDP ranks write before rank 0's merge
        encode_part(config, model, ["image"], tmp_path / "parts", rank=rank, world=2, batch_size=5)
    (tmp_path / "merged").mkdir()
    assert merge_parts(tmp_path / "parts", ["image"], 2, tmp_path / "merged") == {"image": {"rows": 48, "dim": 3 * 24}}
    assert np.array_equal(np.load(tmp_path / "merged" / "image.keys.npy"), np.load(single / "image.keys.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "merged" / "image.npy"), np.load(single / "image.npy"), atol=2e-3)


def test_another_view_count_shares_the_text_rows_instead_of_encoding_them_again(
    tiny_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.training.cache import build
    from distill.training.cache.store import check_entry, entries

    cache = [f"cache.dir={tmp_path / 'cache'}"]
    fill_cache(load_checked(tiny_yaml, [*AUGMENT, *cache]))
    encoded: list[list[str]] = []
    real = build.encode_part
    monkeypatch.setattr(build, "encode_part", lambda c, m, outputs, *a, **k: (encoded.append(outputs), real(c, m, outputs, *a, **k)))
    fill_cache(load_checked(tiny_yaml, [*AUGMENT, *cache, "data.augment.views=2"]))
    assert encoded == [["image"]]  # the captions were not encoded again
    three, two = sorted(entries(tmp_path / "cache").items(), key=lambda e: e[1]["outputs"]["image"]["views"], reverse=True)
    assert (three[0] / "text.npy").stat().st_ino == (two[0] / "text.npy").stat().st_ino
    assert two[1]["outputs"]["image"]["views"] == 2 and check_entry(two[0], two[1], ["image", "text"]) == []
