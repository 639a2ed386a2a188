"""Atomic writes: the target is whole or untouched, and no temporary file is left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.io import atomic_folder, atomic_path, copy_file, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "report.md", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_temporary_keeps_the_suffix_writers_choose_formats_by(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "keys.npy") as tmp:
        assert tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))  # numpy would append .npy to another name
    assert np.load(tmp_path / "keys.npy").tolist() == [0, 1, 2]
    assert copy_file(tmp_path / "keys.npy", tmp_path / "copy.npy").read_bytes() == (tmp_path / "keys.npy").read_bytes()
    assert write_json(tmp_path / "m.json", {"a": 1}).read_text() == '{\n  "a": 1\n}\n'


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    with atomic_folder(tmp_path / "export") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "export") as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["a.txt"]
    with atomic_folder(tmp_path / "export") as tmp:
        (tmp / "b.txt").write_text("2")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_only_distill_io_renames_files_into_place() -> None:
    """Every writer goes through `distill.io`; a rename elsewhere would be a hand-made one."""
    root = Path(__file__).resolve().parent.parent / "distill"
    found = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if path.name != "io.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if any(call in line for call in ("os.replace(", "os.rename(", ".rename(", "shutil.move(", "os.fsync("))
        and "inside the atomic folder" not in line
    ]
    assert not found, found
