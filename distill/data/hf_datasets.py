"""Reading a Hugging Face `datasets` dataset: a `save_to_disk` folder or local parquet files.

Each row holds an image (a `datasets.Image` feature, raw bytes, a `{"bytes", "path"}` dict
or a path relative to `image_root`) and a caption or a list of captions. Rows are assigned
to our splits either by the dataset's own split names (a `DatasetDict`) or by a split
column with Karpathy's values (`train`, `restval`, `val`, `test`); as in `karpathy.py`,
`restval` counts as training data. With an id column, the rows that share an id are one
image with all their captions (datasets with one row per caption), so that retrieval
evaluation counts every caption of an image as its positive.

`datasets` is an optional dependency (`pip install 'distill[datasets]'`), imported on first
use: the registry imports this module whether or not it is installed.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from distill.data.base import (
    CaptionDataset,
    Part,
    clean_captions,
    open_rgb,
    ordered,
    require_path,
    split_items,
    stable_id,
)
from distill.data.webdataset import file_signature
from distill.errors import ConfigError
from distill.registry import DATASETS

INSTALL = "pip install 'distill[datasets]'"
OURS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": ["train", "restval"], "val": ["val", "validation"], "test": ["test"]}
"""Our split -> the dataset's split names (or split-column values) it reads by default."""
REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^hf:")


@dataclass(frozen=True)
class HFImage:
    """One image: its key, id, and the (dataset split, row) pairs that hold it and its captions."""

    key: str
    image_id: int
    rows: tuple[tuple[str, int], ...]


def import_datasets() -> ModuleType:
    """The `datasets` module, or a one-line `ConfigError` naming the extra to install."""
    try:
        import datasets  # optional dependency (the `datasets` extra): only this reader needs it
    except ImportError as e:
        raise ConfigError(
            f"data.dataset: 'hf_datasets' needs the Python package datasets ({e}); {INSTALL}"
        ) from e
    return datasets


@contextmanager
def _quiet(hf: ModuleType) -> Iterator[None]:
    """No progress bars while loading ("Generating train split"), restored afterwards."""
    was_enabled = hf.is_progress_bar_enabled()
    hf.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            hf.enable_progress_bars()


def _why(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _caption_kind_ok(feature: Any) -> bool:
    """A string, or a list of strings (`List`, `Sequence`, `LargeList`, `[Value]`)."""
    if isinstance(feature, list):
        return len(feature) == 1 and _is_string(feature[0])
    inner = getattr(feature, "feature", None)
    return _is_string(feature) or (inner is not None and _is_string(inner))


def _image_kind(hf: ModuleType, feature: Any) -> str | None:
    """"image" (Image feature or {bytes, path} struct), "bytes", "path", or None (unusable)."""
    if isinstance(feature, hf.Image) or (isinstance(feature, dict) and {"bytes", "path"} & set(feature)):
        return "image"
    if getattr(feature, "dtype", None) in ("binary", "large_binary"):
        return "bytes"
    return "path" if _is_string(feature) else None


def _type_name(feature: Any) -> str:
    """How messages name a feature's type: `int64`, `lists of int64`, `Image`."""
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    if inner is not None:
        return f"lists of {_type_name(inner)}"
    return str(getattr(feature, "dtype", None) or type(feature).__name__)


def _files_named(files: list[str]) -> str:
    return files[0] + (f" (and {len(files) - 1} more)" if len(files) > 1 else "") if files else "no file"


def _names(value: Any) -> list[str] | None:
    """A split mapping's value as a list of names; None when it is not a name or a list of names."""
    names = [value] if isinstance(value, str) else value
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


@DATASETS.register("hf_datasets")
class HFDatasets(CaptionDataset):
    """Images and captions from a Hugging Face `datasets` folder or local parquet files.

    Args:
        path: A folder written by `save_to_disk` (a `DatasetDict` or a single `Dataset`).
        data_files: Local parquet files instead of `path`: a path or glob, a list of them, or
            a mapping from the dataset's split names to those. Never the hub: download first.
        image_column: The images: an Image feature, bytes, `{"bytes", "path"}` dicts or paths.
        caption_column: One caption string or a list of captions per row.
        split_column: A column whose values (e.g. train/restval/val/test) assign each row to
            a split; None: the dataset's own split names do (a single Dataset is "train").
        id_column: Image ids (ints or strings); rows sharing an id are one image with all
            their captions. None: every row is one image, keyed `<dataset split>/<row>`.
        splits: Our split (train, val, test) -> the dataset's split names or split-column
            values it reads; default: train <- train + restval, val <- val or validation,
            test <- test.
        image_root: The folder that relative image paths are relative to (default: the
            working directory).
        cache_dir: Where `datasets` caches the arrow copy of parquet files (default: its own
            cache, `HF_DATASETS_CACHE`).
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        split_column: str | None = None,
        id_column: str | None = None,
        splits: dict[str, Any] | None = None,
        image_root: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.path = path
        self.data_files = data_files
        self.image_column = image_column
        self.caption_column = caption_column
        self.split_column = split_column
        self.id_column = id_column
        self.splits_arg = splits
        self.image_root = image_root
        self.cache_dir = cache_dir
        self._parts: dict[str, Any] = {}
        """Dataset split name -> its rows (arrow-formatted, image and caption columns only)."""
        self._files: dict[str, list[str]] = {}
        """Dataset split name -> the files it is read from (arrow files, or the parquet files)."""
        self._source: dict[str, str] = {}
        """Dataset split name -> how messages name it (its folder, or its first parquet file)."""
        self._kind = "image"
        self._index: dict[str, list[HFImage]] | None = None
        self._train_captions: int | None = None

    # ---- loading --------------------------------------------------------------------------

    def _parquet_files(self) -> dict[str, list[str]]:
        """Dataset split name -> its local parquet files, globs expanded (a `ConfigError` otherwise)."""
        spec = self.data_files
        mapping = spec if isinstance(spec, dict) else {"train": spec}
        out, problems = {}, []
        for name, value in mapping.items():
            where = f"data.args.data_files.{name}" if isinstance(spec, dict) else "data.args.data_files"
            patterns = _names(value)
            if patterns is None:
                problems.append(f"{where}: expected a path, a glob or a list of them, got {value!r}")
                continue
            files: list[str] = []
            for pattern in patterns:
                if REMOTE.match(pattern):
                    problems.append(f"{where}: {pattern!r} is not a local file; hf_datasets reads local "
                                    "parquet files only (download them first)")
                    continue
                full = os.path.abspath(os.path.expanduser(pattern))
                found = sorted(f for f in glob.glob(full, recursive=True) if os.path.isfile(f))
                if not found:
                    problems.append(f"{where}: no file matches {full}")
                files += found
            out[str(name)] = files
        if problems:
            raise ConfigError(problems)
        return out

    def _load(self) -> None:
        """Open the data and check its columns; raises one `ConfigError` with every problem."""
        if (self.path is None) == (self.data_files is None):
            raise ConfigError("data.args: give either path (a folder written by save_to_disk) or data_files "
                              "(local parquet files), " + ("not both" if self.path is not None else "neither is set"))
        hf = import_datasets()
        if self.path is not None:
            folder = require_path(self.path, "data.args.path", kind="folder")
            try:
                with _quiet(hf):
                    loaded = hf.load_from_disk(str(folder))
            except Exception as e:  # FileNotFoundError for a plain folder, others for damaged files
                raise ConfigError(f"data.args.path: {folder} is not a dataset folder written by save_to_disk "
                                  f"({_why(e)})") from e
            single = not isinstance(loaded, hf.DatasetDict)
            parts = {"train": loaded} if single else dict(loaded)
            self._source = {n: str(folder if single else folder / n) for n in parts}
            self._files = {n: [c["filename"] for c in ds.cache_files] for n, ds in parts.items()}
        else:
            files = self._parquet_files()
            try:
                with _quiet(hf):
                    parts = dict(hf.load_dataset("parquet", data_files=files, cache_dir=self.cache_dir))
            except Exception as e:  # pyarrow and datasets raise many types on a bad file
                raise ConfigError(f"data.args.data_files: cannot read {_files_named(sum(files.values(), []))} "
                                  f"as parquet ({_why(e)})") from e
            self._files = files
            self._source = {n: _files_named(fs) for n, fs in files.items()}
        self._check_columns(hf, parts)
        self._parts = {n: ds.select_columns([self.image_column, self.caption_column]).with_format("arrow")
                       for n, ds in parts.items()}
        self._index = self._build(parts)

    def _check_columns(self, hf: ModuleType, parts: dict[str, Any]) -> None:
        problems = []
        columns = (("image_column", self.image_column), ("caption_column", self.caption_column),
                   ("split_column", self.split_column), ("id_column", self.id_column))
        for name, ds in parts.items():
            for arg, column in columns:
                if column is None:
                    continue
                if column not in ds.features:
                    problems.append(f"data.args.{arg}: no column {column!r} in {self._source[name]}; "
                                    f"columns: {', '.join(ds.column_names)}")
                    continue
                feature = ds.features[column]
                if arg == "caption_column" and not _caption_kind_ok(feature):
                    problems.append(f"data.args.caption_column: column {column!r} of {self._source[name]} holds "
                                    f"{_type_name(feature)}, not a caption string or a list of strings per row")
                elif arg == "image_column" and (kind := _image_kind(hf, feature)) is None:
                    problems.append(f"data.args.image_column: column {column!r} of {self._source[name]} holds "
                                    f"{_type_name(feature)}, not images (an Image feature, bytes or paths)")
                elif arg == "image_column":
                    self._kind = kind
                elif arg == "id_column" and not (_is_string(feature) or "int" in _type_name(feature)):
                    problems.append(f"data.args.id_column: column {column!r} of {self._source[name]} holds "
                                    f"{_type_name(feature)}, not integer or string ids")
            if problems:  # the same problem in every split of a DatasetDict: once is enough
                raise ConfigError(problems)

    def _wanted(self, available: list[str]) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
        """(the dataset's split name or split value -> ours, ours -> the names it reads, problems).

        `data.args.splits` overrides the defaults split by split and wins over them for a
        name that both give (`{train: test}` leaves no default test split); a name it gives
        must exist, and may be given to one of our splits only.
        """
        problems: list[str] = []
        given = dict(self.splits_arg or {})
        lookup: dict[str, str] = {}
        what = f"column {self.split_column!r} value" if self.split_column else "split"
        defaults = [(ours, value) for ours, value in DEFAULT_SPLITS.items() if ours not in given]
        for ours, value in [*defaults, *given.items()]:
            where = f"data.args.splits.{ours}"
            names = [] if value is None or value == [] else _names(value)
            if ours not in OURS:
                problems.append(f"{where}: unknown split {ours!r}; ours are {', '.join(OURS)}")
                continue
            if names is None:
                problems.append(f"{where}: expected a split name or a list of them, got {value!r}")
                continue
            for n in names:
                if ours in given and n not in available:
                    problems.append(f"{where}: no {what} {n!r} in {self._describe()}; found: "
                                    f"{', '.join(available) or 'no rows'}")
                if lookup.get(n) in given and lookup[n] != ours:
                    problems.append(f"{where}: {n!r} is already read by data.args.splits.{lookup[n]}")
                else:
                    lookup[n] = ours
        reads = {ours: [n for n, o in lookup.items() if o == ours] for ours in OURS}
        return lookup, reads, problems

    def _describe(self) -> str:
        """How messages name the whole dataset: its folder, or its parquet files."""
        if self.path is not None:
            return str(Path(self.path).expanduser())
        return _files_named(sum(self._files.values(), []))

    def _build(self, parts: dict[str, Any]) -> dict[str, list[HFImage]]:
        """Our split -> its images, in stored order; raises for a bad mapping or an empty split
        (the training split, or one that `data.args.splits` names)."""
        values: dict[str, list[Any]] = {}
        if self.split_column:
            values = {n: ds.with_format("arrow")[self.split_column].to_pylist() for n, ds in parts.items()}
            available = sorted({str(v) for vs in values.values() for v in vs if v is not None})
        else:
            available = list(parts)
        lookup, reads, problems = self._wanted(available)
        groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
        ids: dict[tuple[str, str], int] = {}
        for name, ds in parts.items():
            column = ds.with_format("arrow")[self.id_column].to_pylist() if self.id_column else None
            for row in range(len(ds)):
                ours = lookup.get(str(values[name][row]) if self.split_column else name)
                if ours is None:
                    continue
                value = None if column is None else column[row]
                key = f"{name}/{row}" if value is None else str(value)
                if (ours, key) not in groups:
                    groups[(ours, key)] = []
                    is_int = isinstance(value, int) and not isinstance(value, bool)
                    ids[(ours, key)] = value if is_int else stable_id(key)
                groups[(ours, key)].append((name, row))
        out: dict[str, list[HFImage]] = {s: [] for s in OURS}
        for (ours, key), rows in groups.items():
            out[ours].append(HFImage(key, ids[(ours, key)], tuple(rows)))
        named = set(self.splits_arg or {})
        for ours in OURS:
            where = f"data.args.splits.{ours}"
            if out[ours] or not (ours == "train" or ours in named) or any(p.startswith(where) for p in problems):
                continue
            source = self._describe()
            source = f"column {self.split_column!r} of {source}" if self.split_column else source
            problems.append(f"{where}: the {ours} split is empty: {source} has no rows of "
                            f"{', '.join(reads[ours]) or 'any split'} (found: {', '.join(available) or 'no rows'}); "
                            "map the dataset's splits to ours with data.args.splits")
        if problems:
            raise ConfigError(problems)
        return out

    def splits(self) -> dict[str, list[HFImage]]:
        """Our split -> its images, loaded on first use."""
        if self._index is None:
            self._load()
        assert self._index is not None
        return self._index

    # ---- the CaptionDataset interface -----------------------------------------------------

    def check(self) -> list[str]:
        """A missing folder or file, a missing or mistyped column, a bad split mapping, an empty
        split, and (for images stored as paths) missing image files."""
        try:
            splits = self.splits()
        except ConfigError as e:
            return e.problems
        if self._kind != "path":
            return []
        paths = self._image_paths([im for ims in splits.values() for im in ims])
        missing = [p for p in paths if not os.path.isfile(p)]
        if not missing:
            return []
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        where = "data.args.image_root" if self.image_root else f"data.args.image_column ({self.image_column!r})"
        return [f"{where}: {len(missing)} images are missing: {', '.join(missing[:3])}{more}"]

    def has_split(self, split: str) -> bool:
        return bool(self.splits()[split])

    def content_signature(self, split: str = "train") -> dict[str, str]:
        """The files of the dataset splits that feed `split` -> `file_signature` (size, mtime).

        Those are the arrow files of a `save_to_disk` folder, or the parquet files themselves
        (not the arrow copy `datasets` caches). Images stored as paths are signed as
        `karpathy.py` signs them: one `"<n> images <digest>"` per folder, over every image of
        the split (name, size, mtime). Data that cannot be opened signs nothing (`check`
        reports it).
        """
        try:
            images = self.splits()[split]
        except ConfigError:
            return {}
        parts = sorted({name for im in images for name, _ in im.rows})
        out = {f: file_signature(f) for name in parts for f in self._files[name]}
        if self._kind == "path":
            folders: dict[str, list[str]] = {}
            for path in sorted(self._image_paths(images)):
                folder, name = os.path.split(path)
                folders.setdefault(folder, []).append(f"{name}\0{file_signature(path)}\n")
            for folder, lines in folders.items():
                out[folder] = f"{len(lines)} images {hashlib.sha256(''.join(lines).encode()).hexdigest()[:20]}"
        return out

    def train_size(self, captions_per_image: str) -> int | None:
        train = self.splits()["train"]
        if captions_per_image == "random":
            return len(train)
        if self._train_captions is None:
            columns = {n: ds[self.caption_column].to_pylist() for n, ds in self._parts.items()}
            self._train_captions = sum(len(clean_captions(columns[n][r])) for im in train for n, r in im.rows)
        return self._train_captions

    def _image_paths(self, images: list[HFImage]) -> list[str]:
        """The image file of each of `images` (images stored as paths)."""
        columns = {n: ds[self.image_column].to_pylist() for n, ds in self._parts.items()}
        return [self._resolve(columns[im.rows[0][0]][im.rows[0][1]] or "") for im in images]

    def _resolve(self, path: str) -> str:
        return os.path.join(os.path.expanduser(self.image_root), path) if self.image_root else path

    def _image_data(self, value: Any) -> bytes | str | Image.Image | None:
        """What `open_rgb` reads for a stored image value: bytes, a path, or a PIL image."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value) or None
        if isinstance(value, str) and value:
            return self._resolve(value)
        return value if isinstance(value, Image.Image) else None

    def images(
        self, split: str, *, part: Part, seed: int | None, epoch: int, skipped: Counter
    ) -> Iterator[tuple[str, int, Image.Image, list[str]]]:
        entries, stride, offset = split_items(ordered(self.splits()[split], seed, epoch), part)
        if offset:  # fewer images than consumers: sample 0 of each image goes to offset 0 only
            return
        for im in entries:
            records = [self._parts[name][row].to_pylist()[0] for name, row in im.rows]
            captions = [c for rec in records for c in clean_captions(rec[self.caption_column])]
            if not captions:
                skipped["empty_caption"] += 1
                continue
            data = self._image_data(records[0][self.image_column])
            if data is None:
                skipped["missing_image"] += 1
                continue
            try:
                image = data.convert("RGB") if isinstance(data, Image.Image) else open_rgb(data)
            except FileNotFoundError:
                skipped["missing_image"] += 1
                continue
            except Exception:  # PIL raises many types on corrupt data
                skipped["undecodable_image"] += 1
                continue
            yield im.key, im.image_id, image, captions

