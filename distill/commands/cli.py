"""`distill` command line: one module per command in this folder, imported only when run.

Every module defines `add_arguments(parser)` (which sets `fn=run`); `COMMANDS` names the
commands and their one-line help, so `distill --help` lists them without importing any and
`distill search` never imports the training stack. Config problems print one line each on
stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distill.errors import ConfigError
from distill.trust import TRUST

COMMANDS = {
    "fit": "train the students of a graph config (every stage of a staged one)",
    "validate": "check a config and print the resolved graph",
    "graph": "draw the graph of a config",
    "cache": "precompute the frozen teachers' outputs over the training data",
    "eval": "retrieval R@1/5/10 and RSUM of a model (config or checkpoint), or zero-shot classification",
    "index": "mine hard negatives (mine) or build a search index of images (build)",
    "search": "text-to-image search in an index; prints the top k, writes a contact sheet",
    "serve": "a local search page over an index",
    "export": "export a checkpoint's model to ONNX, TorchScript, open_clip or transformers, checked for parity",
    "bench": "efficiency report: size, encode latency, memory, search latency vs index size",
    "sweep": "fit and evaluate every variant of a sweep YAML (per seed); write the table",
    "compare": "is A better than B? paired bootstrap interval and sign test over the test queries",
    "demo": "the main job: teacher, student alone, distilled student, report",
}
"""Command -> help. Each command lives in `distill/commands/<command>.py`."""


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `command`, only that command's module is imported ("": none)."""
    ap = argparse.ArgumentParser(prog="distill", description="Cross-modal, multi-teacher knowledge distillation.")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load checkpoints whose stored config imports plugins or reads pipe: URLs (both run code)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            importlib.import_module(f"distill.commands.{name}").add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = parser(command if command in COMMANDS else "").parse_args(argv)  # "": no command module
    TRUST.checkpoints = args.trust_checkpoint
    try:
        return args.fn(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
