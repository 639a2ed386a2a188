"""Teacher-output cache: frozen teachers' embeddings computed once, read by sample key.

A teacher is frozen and our training preprocessing is deterministic (resize, centre crop,
normalise; tokenise), so `teacher.image` and `teacher.text` are fixed per sample. `distill
cache CONFIG` computes, for every frozen model, the tensor nodes that enabled edges read,
over the whole training split and every caption (so the cache serves
`captions_per_image: all` and `random` alike), and stores them in fp16:

    <cache.dir>/<fingerprint[:20]>/meta.json          what was cached, from what
                                   <output>.npy        (N, D) float16, memory-mapped
                                   <output>.keys.npy   (N,) sorted utf-8 keys (searchsorted)

`image` rows are keyed by image key (one row per image, not per caption), `text` rows by
sample key `<image key>/<caption index>`. The fingerprint hashes the teacher's weights
(every state_dict tensor's name, dtype, shape and bytes, after the configured precision
cast), its class, its image and text preprocessing keys, and the dataset (registered name,
args, class `version`); not `captions_per_image`, since every caption is cached. `fit`
(`resolve_cache`) uses an entry only when the fingerprint matches and it holds every needed
node; otherwise `cache.mode: auto` runs the teacher live (with a warning naming what
changed) and `require` refuses; `never` ignores caches. A model whose needed nodes all come
from the cache is not part of the training graph and its preprocessing is not applied in
the loader. Checking the fingerprint loads the teacher once on the CPU (never runs it);
when the cache folder holds no entry of that model type, nothing is loaded.

Not cached: `pair` nodes (a cross-encoder's scorer over the pairs of one batch: its
candidates depend on which rows share the batch), and any model whose preprocessing
declares augmentation (`ImagePreprocess.deterministic = False`): a cached output would be
one fixed view where training expects a fresh one; caching such a model is refused.

Under DDP (`torchrun ... -m distill cache`), each rank encodes its share of the images
(`Part` split by rank, then loader worker) into `parts/`, and rank 0 merges the parts into
the sorted arrays after a barrier; `meta.json` is written last, so a half-built entry is
never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.config.schema import Config
from distill.core.build import load_models
from distill.core.graph import DTYPES, split_node
from distill.errors import ConfigError
from distill.models.base import Encoder
from distill.registry import DATASETS

log = logging.getLogger(__name__)
CACHEABLE = ("image", "text")
"""Outputs that depend on one sample only (a pair scorer depends on the whole batch)."""


@dataclass(frozen=True)
class Fingerprint:
    """What a cached output depends on, each part hashed separately so a mismatch can say which."""

    weights: str
    image_preprocess: str
    text_preprocess: str
    dataset: str

    def digest(self) -> str:
        """One hex digest of all parts."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict[str, str]) -> list[str]:
        """Names of the parts that differ from `other` (a stored fingerprint)."""
        return [k for k, v in asdict(self).items() if other.get(k) != v]


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
    """The training data: registered dataset name, its args and its class `version`."""
    version = getattr(DATASETS.get(config.data.dataset), "version", 0)
    return _sha(config.data.dataset, dict(config.data.args), version)


def fingerprint(config: Config, name: str, model: Encoder) -> Fingerprint:
    """The fingerprint of model `name` (built as for training) on the config's data.

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
    return Fingerprint(weights_hash(model), keys[0], keys[1], dataset_hash(config))


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


def entries(root: str | Path) -> dict[Path, dict[str, Any]]:
    """Complete cache entries under `root` (folder -> its meta.json)."""
    found = {}
    for meta in sorted(Path(root).expanduser().glob("*/meta.json")):
        try:
            found[meta.parent] = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
    return found


class CachedNode:
    """Reads one cached node's rows by sample key (memory-mapped, opened on first use).

    Args:
        folder: The cache entry.
        output: `image` (rows keyed by image key) or `text` (by sample key).
        node: The graph node it serves, for error messages.
    """

    def __init__(self, folder: str | Path, output: str, node: str) -> None:
        self.folder, self.output, self.node = Path(folder), output, node
        self._keys: np.ndarray | None = None
        self._rows: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickle the paths, not the mapped arrays
        return {**self.__dict__, "_keys": None, "_rows": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None or self._rows is None:
            self._keys = np.load(self.folder / f"{self.output}.keys.npy", mmap_mode="r")
            self._rows = np.load(self.folder / f"{self.output}.npy", mmap_mode="r")
        return self._keys, self._rows

    def __call__(self, keys: list[str]) -> Tensor:
        """(len(keys), D) float32 rows of these sample keys.

        Raises:
            KeyError: If a key is not in the cache (the data changed under the same args).
        """
        stored, rows = self._open()
        wanted = [k.rsplit("/", 1)[0] for k in keys] if self.output == "image" else keys
        query = np.array([k.encode() for k in wanted])
        idx = np.searchsorted(stored, query).clip(0, max(len(stored) - 1, 0))
        found = stored[idx] == query if len(stored) else np.zeros(len(wanted), dtype=bool)
        if not found.all():
            missing = [k for k, ok in zip(wanted, found) if not ok]
            raise KeyError(
                f"{self.node}: {len(missing)} keys (e.g. {missing[0]!r}) are not in the cache {self.folder}; "
                "the data changed under the same args: rebuild with `distill cache`"
            )
        return torch.from_numpy(np.asarray(rows[idx], dtype=np.float32))


def find_entry(config: Config, name: str, model: Encoder, outputs: list[str]) -> tuple[Path | None, str]:
    """The entry serving `outputs` of `model`, or (None, why not)."""
    fp = fingerprint(config, name, model)
    stale = []
    for folder, meta in entries(config.cache.dir).items():
        if meta.get("fingerprint") == fp.digest():
            missing = [o for o in outputs if o not in meta.get("outputs", {})]
            if not missing:
                return folder, ""
            stale.append(f"{folder} lacks {', '.join(missing)}")
        elif meta.get("model", {}).get("type") == config.models[name].type:
            changed = fp.differences(meta.get("parts", {}))
            stale.append(f"{folder} was built with different {', '.join(changed)}")
    return None, "; ".join(stale) or f"no cache in {config.cache.dir}"


def resolve_cache(config: Config) -> dict[str, CachedNode]:
    """Node -> cached lookup for every needed teacher node a matching entry serves.

    Raises:
        ConfigError: Under `cache.mode: require`, for any needed node not served.
    """
    if config.cache.mode == "never":
        return {}
    found: dict[str, CachedNode] = {}
    problems = []
    candidates = {m.get("model", {}).get("type") for m in entries(config.cache.dir).values()}
    for name, outputs in cache_plan(config).items():
        where = f"cache.dir: {', '.join(f'{name}.{o}' for o in outputs)}"
        folder, why = None, f"no cache of a {config.models[name].type!r} model in {config.cache.dir}"
        try:
            if config.models[name].type in candidates:  # else nothing to compare: skip the load
                folder, why = find_entry(config, name, load_frozen(config, name), outputs)
        except ConfigError as e:  # augmented inputs: never cached
            if config.cache.mode == "require":
                problems.extend(e.problems)
            else:
                log.warning("%s: the teacher runs live: %s", where, "; ".join(e.problems))
            continue
        if folder is not None:
            found.update({f"{name}.{o}": CachedNode(folder, o, f"{name}.{o}") for o in outputs})
            log.info("%s: read from %s", where, folder)
        elif config.cache.mode == "require":
            problems.append(f"{where}: no matching cache ({why}); build it with `distill cache CONFIG`")
        elif config.models[name].type in candidates:
            log.warning("%s: no matching cache (%s): the teacher runs live", where, why)
    if problems:
        raise ConfigError(problems)
    return found
