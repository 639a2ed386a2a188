"""What a cache entry depends on: the fingerprint of a frozen model's outputs on the data.

The fingerprint hashes, each part separately so that a mismatch can say which:

- `weights`: the teacher's class and every state_dict tensor's name, dtype, shape and bytes
  (after the configured precision cast);
- `image_preprocess`, `text_preprocess`: the class and `key()` of each preprocessing;
- `dataset`: the registered dataset name, its args and its class `version`;
- `content`: the dataset's `content_signature()` of the training files, a signature per
  file (shard, JSON, image folder) from its size and mtime (one stat per file, no
  reading). The per-file signatures are stored in the entry's `meta.json` (`files`), so a
  changed file is named: `<shard> changed`.

- `augment` (only when training augments images and the image output is cached): the view
  settings of `data.augment` (`distill.augment.AugmentSpec.key`: crop ranges, flip, jitter,
  the number of views V and their seed), stored in `meta.json` so that a miss names the
  setting that changed (`data.augment.views (4 in the cache, 8 now)`). Without augmentation
  the part is absent, so entries built before it keep their fingerprints.

Not `captions_per_image`, since every caption is cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.augment import AugmentSpec
from distill.config.schema import Config
from distill.core.build import load_models
from distill.core.graph import DTYPES, split_node
from distill.data.base import open_dataset
from distill.errors import ConfigError
from distill.models.base import Encoder
from distill.registry import DATASETS

CACHEABLE = ("image", "text")
"""Outputs that depend on one sample only (a pair scorer depends on the whole batch)."""
PARTS = ("weights", "image_preprocess", "text_preprocess", "dataset", "content")
"""The hashed parts of a `Fingerprint`, in the order a mismatch names them."""


@dataclass(frozen=True)
class Fingerprint:
    """What a cached output depends on, each part hashed separately so a mismatch can say which.

    `files` (data file -> signature) is what `content` hashes, kept to name a changed file.
    """

    weights: str
    image_preprocess: str
    text_preprocess: str
    dataset: str
    content: str
    files: dict[str, str] = field(default_factory=dict, compare=False)
    augment: str = ""
    settings: dict[str, Any] = field(default_factory=dict, compare=False)
    """The `data.augment` settings `augment` hashes (empty: no augmented views cached)."""

    def parts(self) -> dict[str, str]:
        """Part name -> its hash (what `meta.json` stores under `parts`); `augment` only when set."""
        return {k: getattr(self, k) for k in PARTS} | ({"augment": self.augment} if self.augment else {})

    def digest(self) -> str:
        """One hex digest of all parts (the entry's folder is its first 20 digits)."""
        return hashlib.sha256(json.dumps(self.parts(), sort_keys=True).encode()).hexdigest()

    def differences(self, meta: dict[str, Any]) -> list[str]:
        """What differs from a stored entry's `meta.json`: part names, and for `content`
        (when the dataset args are the same) which files changed."""
        stored = meta.get("parts", {})
        out = [k for k in PARTS if k != "content" and stored.get(k) != getattr(self, k)]
        if stored.get("augment", "") != self.augment:
            out.append(augment_changes(meta.get("augment") or {}, self.settings))
        if stored.get("content") != self.content:
            if "files" not in meta:
                out.append("content (not recorded: the entry predates data signatures)")
            elif "dataset" in out:  # other args: other files, already said
                pass
            else:
                out.append(f"content ({file_changes(meta['files'], self.files)})")
        return out


def file_changes(old: dict[str, str], new: dict[str, str], shown: int = 3) -> str:
    """`<file> changed, <file> is new, <file> is gone` for the first `shown` differing files."""
    lines = [_change(f, old, new) for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return ", ".join(lines[:shown]) + more


def augment_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`data.augment.views (4 in the cache, 8 now), ...`: the view settings that differ."""
    if not old or not new:
        return f"data.augment ({'augmented views' if old else 'no augmentation'} in the cache, " \
               f"{'augmented views' if new else 'no augmentation'} now)"
    changed = [f"data.augment.{k} ({old.get(k)} in the cache, {new.get(k)} now)"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed) or "data.augment"


def _change(file: str, old: dict[str, str], new: dict[str, str]) -> str:
    if file not in new:
        return f"{file} is gone"
    if file not in old:
        return f"{file} is new"
    return f"{file} is missing" if new[file] == "missing" else f"{file} changed"


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the class and every state_dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def dataset_hash(config: Config) -> str:
    """The training data's configuration: registered dataset name, its args and its class `version`."""
    version = getattr(DATASETS.get(config.data.dataset), "version", 0)
    return _sha(config.data.dataset, dict(config.data.args), version)


def data_files(config: Config) -> dict[str, str]:
    """The training split's data file -> signature (`CaptionDataset.content_signature`)."""
    return open_dataset(config.data.dataset, config.data.args).content_signature("train")


def fingerprint(config: Config, name: str, model: Encoder, files: dict[str, str] | None = None) -> Fingerprint:
    """The fingerprint of model `name` (built as for training) on the config's data.

    Args:
        config: The experiment.
        name: The model's name in `config.models`.
        model: The model, built as `load_frozen` builds it.
        files: `data_files(config)` when already computed (it stats every data file).

    Raises:
        ConfigError: If the model's preprocessing augments its inputs.
    """
    keys = []
    for kind, pp in (("image", model.image_preprocess()), ("text", model.text_preprocess())):
        if pp is not None and not getattr(pp, "deterministic", True):
            raise ConfigError(
                f"models.{name}: its {kind} preprocessing ({type(pp).__name__}) augments inputs, so its "
                "outputs differ per epoch and cannot be cached; set cache.mode=never"
            )
        keys.append(_sha(type(pp).__qualname__, pp.key()) if pp is not None else "")
    files = data_files(config) if files is None else files
    settings = augment_settings(config, name)
    return Fingerprint(weights_hash(model), keys[0], keys[1], dataset_hash(config), _sha(files), dict(files),
                       _sha(settings) if settings else "", settings)


def augment_settings(config: Config, name: str) -> dict[str, Any]:
    """The `data.augment` settings model `name`'s cached image rows depend on ({} when training
    does not augment or its image output is not cached).

    Raises:
        ConfigError: If training draws a fresh view every epoch (`views: null`): no finite
            set of views to cache.
    """
    spec = AugmentSpec.from_config(config.data.augment)
    if spec is None or "image" not in cache_plan(config).get(name, []):
        return {}
    if spec.views is None:
        raise ConfigError(
            f"data.augment.views: null draws a fresh view every epoch, so models.{name}.image cannot be "
            "cached; set data.augment.views=V to cache V views per image, or cache.mode=never"
        )
    return spec.key()


def cache_plan(config: Config) -> dict[str, list[str]]:
    """Frozen model -> its cacheable outputs that enabled edges read (config order)."""
    plan: dict[str, list[str]] = {}
    for edge in config.edges.values():
        for node in edge.inputs if edge.enabled else ():
            model, output = split_node(node)
            if model in config.models and config.models[model].frozen and output in CACHEABLE:
                plan.setdefault(model, [])
                if output not in plan[model]:
                    plan[model].append(output)
    return plan


def load_frozen(config: Config, name: str) -> Encoder:
    """Model `name` as `build_graph` makes it (init, precision), in eval mode, without
    disturbing the global RNG (random-init parts come from `config.seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = load_models(config, [name])[name]
    precision = config.models[name].precision
    if precision != "fp32":
        model.to(DTYPES[precision])
    return model.eval().requires_grad_(False)
