"""Datasets (registered in `DATASETS`) and the Lightning data module.

Importing this package registers every dataset: "webdataset", "karpathy" and "synthetic".
"""

from distill.data import karpathy, synthetic, webdataset  # noqa: F401  (fill the registry)
from distill.data.base import CaptionDataset, EvalImage, Part, Sample, split_items
from distill.data.datamodule import DistillDataModule

__all__ = ["CaptionDataset", "DistillDataModule", "EvalImage", "Part", "Sample", "split_items"]
