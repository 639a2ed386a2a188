"""Datasets; `DATASETS` imports every module here on first lookup ("webdataset", "karpathy",
"hf_datasets", "synthetic"). Pure torch and webdataset: the Lightning data module is in `distill.training`."""

from distill.data.base import CaptionDataset, EvalImage, Part, Sample, split_items

__all__ = ["CaptionDataset", "EvalImage", "Part", "Sample", "split_items"]
