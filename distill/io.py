"""Atomic writes: every file or folder distill writes appears whole or not at all.

A writer fills a temporary sibling (same folder, so the same filesystem), which is flushed
to disk, renamed over the target, and the folder itself is fsynced so that the rename
survives a power cut. A killed process leaves at most a `.tmp-*` sibling, never a
truncated target. The temporary name keeps the target's suffix, because some writers
choose the format from it (`numpy.save` appends `.npy`, `savefig` reads `.png`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk (folders: the entries)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def temporary_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh name next to `path` with the same suffix: `.tmp-<id>-<name>`."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, keep: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary file path to write; on success it replaces `path` atomically.

    For writers that take a path (`torch.save`, `numpy.save`, `savefig`, ONNX export). On
    an exception the temporary file is removed and `path` is left as it was.

    Args:
        path: The target.
        keep: Where the file at `path` goes once the new one is complete (the previous
            good checkpoint, say); a file already at `keep` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _fsync_path(tmp)
        if keep is not None and path.is_file():
            os.replace(path, keep)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder `path`.

    An existing folder at `path` is moved aside first and deleted after the new one is in
    place, so readers see either the old folder or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = temporary_sibling(path) if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically; return the path."""
    return write_text(path, json.dumps(data, indent=2, **dumps) + "\n")


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy `src` over `dst` atomically; return `dst`."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
