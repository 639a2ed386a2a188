"""Arguments several commands share."""

from __future__ import annotations

import argparse

EMBEDDER = "an export folder (manifest.json) or a .ckpt written by `distill fit` (path.ckpt:model picks a model)"


def config_arguments(p: argparse.ArgumentParser) -> None:
    """An experiment YAML and dotted overrides."""
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. edges.si_tt.enabled=false")


def target_arguments(p: argparse.ArgumentParser) -> None:
    """An experiment YAML (models as built) or a checkpoint (models as trained), and overrides."""
    p.add_argument("target", help="experiment YAML (model as built) or a .ckpt written by `distill fit`")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def query_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The options `search` and `serve` share: which embedder answers, where, and how."""
    p.add_argument("--model", default=None, help=f"encode {what} with another embedder of the same dimension: {EMBEDDER}")
    p.add_argument("--faiss", action="store_true", help="search with FAISS (IndexFlatIP) instead of torch")
    p.add_argument("--device", default="cpu", help="where to run a checkpoint's model")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the query encoder and search (0: library defaults)")
