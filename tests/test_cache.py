"""Teacher-output cache: a hit never runs the teacher; misses and stale entries never serve."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.commands.cli import main
from distill.config.schema import Config, EdgeConfig, ModelConfig
from distill.core.build import build_graph
from distill.core.check import load_checked
from distill.data.synthetic import SyntheticShapes
from distill.errors import ConfigError
from distill.models.base import ImagePreprocess
from distill.models.dual_encoder import Towers
from distill.training.cache.build import encode_part, fill_cache, merge_parts
from distill.training.cache.fingerprint import cache_plan, load_frozen
from distill.training.cache.store import (
    CachedNode,
    check_entry,
    entries,
    find_entry,
    npy_header,
    resolve_cache,
)
from distill.training.checkpoint import load_checkpoint
from distill.training.module import DistillModule
from distill.training.trainer import make_datamodule
from tests.conftest import TINY

TEACHER = "type: tiny_dual\n    frozen: true\n    args: {embed_dim: 24, image_size: 32}"
NODES = ["image", "text"]


def write_config(folder: Path, data_root: Path, towers: Path) -> Path:
    """The tiny test graph with a saved towers teacher and a cache folder of its own."""
    text = TINY.format(out=folder / "run", data=data_root)
    text = text.replace(TEACHER, f"type: towers\n    frozen: true\n    args: {{path: '{towers}'}}")
    path = folder / "cached.yaml"
    path.write_text(text + f"cache: {{dir: '{folder / 'cache'}'}}\n")
    return path


def built(folder: Path, data_root: Path, towers: Path) -> Path:
    """The config (with its own copy of the teacher) and its cache, built by `distill cache`."""
    path = write_config(folder, data_root, Path(shutil.copytree(towers, folder / "towers")))
    assert main(["cache", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def shared_yaml(tmp_path_factory: pytest.TempPathFactory, data_root: Path, tiny_towers: Path) -> Path:
    """A built cache for the tests that leave it as it is."""
    return built(tmp_path_factory.mktemp("cache"), data_root, tiny_towers)


@pytest.fixture
def cached_yaml(tmp_path: Path, data_root: Path, tiny_towers: Path) -> Path:
    """A built cache of the test's own, to change."""
    return built(tmp_path, data_root, tiny_towers)


def never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the cached teacher ran")


def test_hit_skips_the_teacher_and_matches_the_live_loss(shared_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_checked(shared_yaml, ["cache.mode=require"])
    live = build_graph(cfg).train()  # frozen models switch to eval mode
    cached = resolve_cache(cfg)
    assert set(cached) == {"teacher.text", "teacher.image"}
    graph = build_graph(cfg, cached).train()
    assert list(graph.models) == ["student"] and graph.needed_models() == ["student"]
    graph.load_state_dict(live.state_dict(), strict=False)  # the same student and loss weights
    loader_models = make_datamodule(cfg, DistillModule(cfg, graph=graph)).train_collator.models
    assert loader_models == ["student"]  # the teacher's preprocessing is not applied
    batch = next(iter(make_datamodule(cfg, DistillModule(cfg, graph=live)).train_dataloader()))
    expected = live(batch)
    monkeypatch.setattr(Towers, "encode", never)
    got = graph(batch)
    for key, value in expected.items():  # fp16 storage keeps about 3 significant digits
        torch.testing.assert_close(got[key], value, rtol=2e-3, atol=2e-3, msg=key)
    assert torch.equal(got["edge/si_st"], expected["edge/si_st"])  # student only: untouched


def test_fit_reads_the_cache_and_its_checkpoint_loads_live(
    shared_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Towers, "encode", never)
    assert main(["fit", str(shared_yaml), "cache.mode=require", "trainer.max_steps=3", f"output_dir={tmp_path}"]) == 0
    monkeypatch.undo()
    ckpt = tmp_path / "final.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(".teacher." in k for k in state)  # the teacher was never part of training
    module = load_checkpoint(ckpt)  # a live graph (teacher loaded) takes the cached run's weights
    assert "teacher" in module.graph.models
    key = "models.student.tokens.weight"
    assert torch.equal(module.graph.state_dict()[key], state[f"graph.{key}"])


def test_miss_runs_live_in_auto_mode_and_is_refused_in_require_mode(
    tmp_path: Path, data_root: Path, tiny_towers: Path
) -> None:
    path = write_config(tmp_path, data_root, tiny_towers)
    assert resolve_cache(load_checked(path)) == {}
    assert resolve_cache(load_checked(path, ["cache.mode=never"])) == {}
    with pytest.raises(ConfigError) as e:
        resolve_cache(load_checked(path, ["cache.mode=require"]))
    assert e.value.problems == [
        f"cache.dir: teacher.text, teacher.image: no matching cache (no cache of a 'towers' model in "
        f"{tmp_path / 'cache'}); build it with `distill cache CONFIG`"
    ]
    with pytest.raises(ConfigError, match=r"cache.mode: expected one of auto, require, never, got 'sometimes'"):
        load_checked(path, ["cache.mode=sometimes"])


def change_towers(dst: Path, what: str) -> None:
    """Retrain (perturb) the teacher in its folder, or change its caption length."""
    if what == "weights":
        heads = load_file(str(dst / "heads.safetensors"))
        heads["image_proj.bias"] = heads["image_proj.bias"] + 1e-3
        save_file(heads, str(dst / "heads.safetensors"))
    else:  # the text preprocessing: captions cut at another length
        settings = json.loads((dst / "towers.json").read_text())
        (dst / "towers.json").write_text(json.dumps({**settings, "max_length": settings["max_length"] - 8}))


@pytest.mark.parametrize("change", ["weights", "text_preprocess", "dataset"])
def test_a_changed_teacher_preprocessing_or_dataset_invalidates(
    cached_yaml: Path, change: str
) -> None:
    overrides = []
    if change == "dataset":
        overrides = ["data.args.format=karpathy"]  # the same files read otherwise: other args, other data
    else:
        change_towers(cached_yaml.parent / "towers", change)
    cfg = load_checked(cached_yaml, overrides)
    folder, why = find_entry(cfg, "teacher", load_frozen(cfg, "teacher"), NODES)
    assert folder is None and why.endswith(f"was built with different {change}")
    assert resolve_cache(cfg) == {}  # auto: the teacher runs live, never the stale rows
    with pytest.raises(ConfigError, match=f"different {change}\\); build it with"):
        resolve_cache(load_checked(cached_yaml, [*overrides, "cache.mode=require"]))
    if change == "weights":  # rebuilding adds a second entry, which then serves
        fill_cache(cfg)
        assert len(entries(cfg.cache.dir)) == 2 and set(resolve_cache(cfg)) == {"teacher.text", "teacher.image"}


class Augmenting(ImagePreprocess):
    deterministic = False


def test_augmented_teacher_inputs_are_never_cached(shared_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Towers, "image_preprocess", lambda self: Augmenting(size=32))
    cfg = load_checked(shared_yaml)
    with pytest.raises(ConfigError, match=r"models.teacher: its image preprocessing \(Augmenting\) augments inputs"):
        fill_cache(cfg)
    assert resolve_cache(cfg) == {}  # auto: runs live
    with pytest.raises(ConfigError, match="augments inputs"):
        resolve_cache(load_checked(shared_yaml, ["cache.mode=require"]))


def test_rank_parts_merge_to_the_single_process_cache(shared_yaml: Path, tmp_path: Path) -> None:
    cfg = load_checked(shared_yaml)
    (single,) = entries(cfg.cache.dir)
    model = load_frozen(cfg, "teacher")
    for rank in range(2):  # what two DDP ranks write, then rank 0's merge
        encode_part(cfg, model, NODES, tmp_path / "parts", rank=rank, world=2, batch_size=7)
    merged = tmp_path / "merged"
    merged.mkdir()
    shapes = merge_parts(tmp_path / "parts", NODES, 2, merged)
    assert shapes == {"image": {"rows": 48, "dim": 24}, "text": {"rows": 240, "dim": 24}}
    for output in NODES:
        assert np.array_equal(np.load(merged / f"{output}.keys.npy"), np.load(single / f"{output}.keys.npy"))
        np.testing.assert_allclose(np.load(merged / f"{output}.npy"), np.load(single / f"{output}.npy"), atol=2e-3)


def test_lookup_by_sample_key(shared_yaml: Path) -> None:
    (folder,) = entries(load_checked(shared_yaml).cache.dir)
    image, text = CachedNode(folder, "image", "teacher.image"), CachedNode(folder, "text", "teacher.text")
    keys = [k.decode() for k in np.load(folder / "text.keys.npy")[[7, 0, 7]]]
    rows = text(keys)
    assert rows.dtype == torch.float32 and torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])
    same_image = [f"{keys[0].rsplit('/', 1)[0]}/{i}" for i in range(3)]  # one image row serves every caption
    assert torch.equal(image(same_image)[0], image(same_image)[2])
    with pytest.raises(ConfigError, match="keys of teacher.text \\(e.g. 'no-such-image/0'\\) are not in this cache"):
        text([keys[0], "no-such-image/0"])


def test_only_tensor_nodes_of_frozen_models_are_cached() -> None:
    cfg = Config(
        models={"student": ModelConfig(type="tiny_dual"), "teacher": ModelConfig(type="towers", frozen=True),
                "fused": ModelConfig(type="fusion", frozen=True)},
        edges={"a": EdgeConfig(loss="itm_hard", inputs=["fused.pair", "student.image", "student.text"]),
               "b": EdgeConfig(loss="infonce", inputs=["student.image", "teacher.text"]),
               "c": EdgeConfig(loss="infonce", inputs=["student.text", "teacher.image"], enabled=False)},
    )
    assert cache_plan(cfg) == {"teacher": ["text"]}  # pair scorers depend on the batch; c is off


def own_data(tmp_path: Path, data_root: Path) -> Path:
    """A copy of the generated data (the shared one is generated by `shared_yaml`), to change."""
    return Path(shutil.copytree(data_root, tmp_path / "data"))


def rewrite_captions(shard: Path) -> None:
    """Change every caption of a shard in place, keeping its keys (and its size: upper case)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith((".txt", ".json")):
                data = data.upper() if member.name.endswith(".txt") else json.dumps(
                    {**json.loads(data), "captions": [c.upper() for c in json.loads(data)["captions"]]}
                ).encode()
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_content_signatures_sign_every_data_file(shared_yaml: Path, data_root: Path, tmp_path: Path) -> None:
    args = {"n_train": 48, "n_val": 12, "n_test": 12, "image_size": 32}
    shards = SyntheticShapes(**args, root=str(data_root)).content_signature()
    assert list(shards) == [str(data_root / "train" / "00000.tar")]  # one stat per shard
    data = own_data(tmp_path, data_root)
    karpathy = SyntheticShapes(**args, root=str(data), format="karpathy")
    before = karpathy.content_signature()
    assert set(before) == {str(data / "dataset_synthetic.json"), str(data / "images")}
    assert before[str(data / "images")].startswith("48 images ")  # the training images only
    os.utime(data / "images" / "000000005.jpg", ns=(1, 1))  # an image replaced under the same name
    after = SyntheticShapes(**args, root=str(data), format="karpathy").content_signature()
    assert [f for f in before if before[f] != after[f]] == [str(data / "images")]


def test_a_shard_changed_under_the_same_keys_is_a_miss_naming_it(
    shared_yaml: Path, tmp_path: Path, data_root: Path, tiny_towers: Path
) -> None:
    data = own_data(tmp_path, data_root)
    path = built(tmp_path, data, tiny_towers)
    shard = data / "train" / "00000.tar"
    size = shard.stat().st_size
    rewrite_captions(shard)
    assert shard.stat().st_size == size  # same keys, same size: only the contents changed
    cfg = load_checked(path)
    folder, why = find_entry(cfg, "teacher", load_frozen(cfg, "teacher"), NODES)
    assert folder is None and why.endswith(f"was built with different content ({shard} changed)")
    assert resolve_cache(cfg) == {}  # auto: the teacher runs live
    with pytest.raises(ConfigError) as e:
        resolve_cache(load_checked(path, ["cache.mode=require"]))
    assert len(e.value.problems) == 1 and f"({shard} changed)" in e.value.problems[0]
    assert main(["cache", str(path)]) == 0  # a plain rebuild: a new folder; the old entry never matches again
    assert len(entries(cfg.cache.dir)) == 2 and set(resolve_cache(cfg)) == {"teacher.text", "teacher.image"}


def test_force_rebuilds_an_intact_entry(cached_yaml: Path) -> None:
    cfg = load_checked(cached_yaml)
    (folder,) = entries(cfg.cache.dir)
    inode = (folder / "text.npy").stat().st_ino
    assert main(["cache", str(cached_yaml)]) == 0 and (folder / "text.npy").stat().st_ino == inode  # intact: kept
    assert main(["cache", str(cached_yaml), "--force"]) == 0
    assert (folder / "text.npy").stat().st_ino != inode  # rewritten
    assert list(entries(cfg.cache.dir)) == [folder] and check_entry(folder, entries(cfg.cache.dir)[folder], NODES) == []
    assert set(resolve_cache(load_checked(cached_yaml, ["cache.mode=require"]))) == {"teacher.text", "teacher.image"}


def test_a_truncated_array_falls_back_in_auto_and_is_refused_in_require(
    cached_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    (folder,) = entries(load_checked(cached_yaml).cache.dir)
    text = folder / "text.npy"
    full = text.stat().st_size
    os.truncate(text, full - 100)
    fit = ["fit", str(cached_yaml), "trainer.max_steps=2"]
    assert main([*fit, "cache.mode=require", f"output_dir={tmp_path / 'require'}"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: cache.dir: teacher.text, teacher.image: no matching cache ({folder} is damaged: {text}: truncated "
        f"({full - 100} of {full} bytes)); build it with `distill cache CONFIG`"
    ]
    with caplog.at_level(logging.WARNING, logger="distill.training.cache.store"):
        assert main([*fit, f"output_dir={tmp_path / 'auto'}"]) == 0  # trains with the live teacher
    assert (tmp_path / "auto" / "final.ckpt").is_file()
    assert any(f"{text}: truncated" in r.getMessage() and r.getMessage().endswith("the teacher runs live")
               for r in caplog.records)
    with pytest.raises(ConfigError) as e:  # read anyway: one line, not numpy's traceback
        CachedNode(folder, "text", "teacher.text")(["000000000/0"])
    assert e.value.problems == [
        f"{text}: cannot be read for teacher.text (mmap length is greater than file size); "
        "rebuild it with `distill cache CONFIG --force`"
    ]
    assert main(["cache", str(cached_yaml)]) == 0  # a plain `distill cache` rebuilds what is damaged
    assert text.stat().st_size == full and check_entry(folder, entries(folder.parent)[folder], NODES) == []


def test_verify_finds_flipped_bytes(cached_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", str(cached_yaml), "--verify"]) == 0
    (folder,) = entries(load_checked(cached_yaml).cache.dir)
    out = capsys.readouterr().out
    assert out.startswith("teacher      ok: ") and out.strip().endswith(f"-> {folder}")
    image = folder / "image.npy"
    with open(image, "r+b") as f:  # one bit of one fp16 mantissa: still finite, same size
        f.seek(-7, os.SEEK_END)
        byte = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    assert main(["cache", str(cached_yaml), "--verify"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {image}: damaged: its sha256 differs from the one in meta.json; "
        "rebuild it with `distill cache CONFIG --force`"
    ]
    assert resolve_cache(load_checked(cached_yaml, ["cache.mode=require"]))  # sizes are fine: only --verify reads


def test_non_finite_rows_stop_at_the_first_batch_with_one_line(
    cached_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder,) = entries(load_checked(cached_yaml).cache.dir)
    text = folder / "text.npy"
    (rows, dim), _, size = npy_header(text)
    with open(text, "r+b") as f:  # every byte of every row flipped to 0xff: fp16 NaN, same size
        f.seek(size - rows * dim * 2)
        f.write(b"\xff" * (rows * dim * 2))
    cached = resolve_cache(load_checked(cached_yaml, ["cache.mode=require"]))  # headers and sizes pass
    keys = [k.decode() for k in np.load(folder / "text.keys.npy")[:2]]
    with pytest.raises(ConfigError) as e:
        cached["teacher.text"](keys)
    assert e.value.problems == [
        f"{text}: 2 of 2 rows read for teacher.text are not finite (e.g. {keys[0]!r}): the file is damaged; "
        "check it with `distill cache CONFIG --verify` and rebuild it with `distill cache CONFIG --force`"
    ]
    out = tmp_path / "run"
    assert main(["fit", str(cached_yaml), "cache.mode=require", "trainer.max_steps=2", f"output_dir={out}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {text}: ") and "are not finite" in line
    assert not (out / "final.ckpt").exists()  # stopped at the first batch, not at the final validation


def test_a_teacher_giving_non_finite_rows_is_not_cached(
    tmp_path: Path, data_root: Path, tiny_towers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_checked(write_config(tmp_path, data_root, tiny_towers))
    monkeypatch.setattr(Towers, "encode", lambda self, output, inputs: torch.full((len(next(iter(inputs.values()))), 24), 7e4))
    with pytest.raises(ConfigError, match=r"models.teacher: its text output for '\d+/0' is not finite in fp16"):
        fill_cache(cfg)
    assert entries(cfg.cache.dir) == {}  # nothing half-built is served
