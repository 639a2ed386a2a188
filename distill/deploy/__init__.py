"""Deployment: export a trained model, run the export, measure it.

- `export.py`   `distill export`: ONNX or TorchScript folder, checked for parity; and
  `export_openclip.py` / `export_hf.py`: folders open_clip / transformers load as is
- `parity.py`   export vs PyTorch per embedding; the recall cost of an int8 text encoder
- `runtime.py`  `ExportedModel`: an export folder as images/captions -> embeddings
- `bench.py`    `distill bench`: size, encode latency, memory, search latency vs index size
- the other modules: image index, text-to-image search and the local web page

Heavy modules (torch.onnx, onnxruntime) load only when these functions run.
"""

from __future__ import annotations

from distill.deploy.runtime import ExportedModel, read_manifest

__all__ = ["ExportedModel", "read_manifest"]
