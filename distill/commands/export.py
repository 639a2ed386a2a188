"""`distill export CKPT`: a checkpoint's model as an ONNX or TorchScript folder, or an open_clip or
transformers folder that library loads by itself, checked for parity."""

from __future__ import annotations

import argparse
import sys

from distill.deploy.export import export_checkpoint, summary
from distill.deploy.parity import ParityError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt written by `distill fit`")
    p.add_argument("--format", default="onnx",
                   help="onnx or torchscript; open_clip (open_clip and dual-encoder students) or hf (transformers "
                        "students): a folder open_clip / transformers loads without distill")
    p.add_argument("--model", default=None, help="which model of the checkpoint (default eval.model)")
    p.add_argument("--output", "--out", default=None, help="export folder (default <checkpoint folder>/export-<model>-<format>)")
    p.add_argument("--quantize-text", default=None, help="int8: dynamic int8 text encoder (onnx); prints its recall cost")
    p.add_argument("--images", default=None, help="folder of parity images (default: the dataset's test split)")
    p.add_argument("--captions", default=None, help="file of parity captions, one a line (default: the test split's)")
    p.add_argument("--weights", action="store_true", help="also write the PyTorch weights as weights.safetensors")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    try:
        folder = export_checkpoint(
            args.checkpoint, format=args.format, model=args.model, output=args.output,
            quantize_text=args.quantize_text, images=args.images, captions=args.captions, weights=args.weights,
        )  # fmt: skip
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(folder))
    return 0
