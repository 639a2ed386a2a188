"""The batch types that flow from the data pipeline into the graph.

Each model brings its own preprocessing, so a batch carries one set of input tensors per
model name (`inputs["teacher"]["pixel_values"]`, `inputs["student"]["input_ids"]`, ...).
Models with identical preprocessing share the same tensor objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

ModelInputs = dict[str, Tensor]
"""Inputs of one model: any of `pixel_values`, `input_ids`, `attention_mask`."""


@dataclass
class Batch:
    """A training batch of image-caption pairs; row i of the image and text inputs pair up.

    Attributes:
        keys: One sample key per row (`<image key>/<caption index>`).
        image_ids: (B,) int64; rows whose captions describe the same image share an id, so
            losses treat them as positives of each other rather than as negatives.
        inputs: Model name -> that model's preprocessed inputs for these rows.
        views: (B,) int64, the augmented view each row's image shows (`distill.augment`;
            the teacher cache reads that view's rows), or None without augmentation.
    """

    keys: list[str]
    image_ids: Tensor
    inputs: dict[str, ModelInputs] = field(default_factory=dict)
    views: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on `device` (shared tensors stay shared)."""
        moved: dict[int, Tensor] = {}

        def move(t: Tensor) -> Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=True)
            return moved[id(t)]

        return Batch(
            keys=list(self.keys),
            image_ids=move(self.image_ids),
            inputs={m: {k: move(v) for k, v in d.items()} for m, d in self.inputs.items()},
            views=None if self.views is None else move(self.views),
        )


@dataclass
class RetrievalBatch:
    """An evaluation batch: B images and all their captions (e.g. 5 per image).

    Attributes:
        image_ids: (B,) int64 global ids of the images.
        text_image_ids: (T,) int64; the image id each caption belongs to.
        image_inputs: Model name -> {"pixel_values": (B, 3, H, W)}.
        text_inputs: Model name -> {"input_ids", "attention_mask"}: (T, L).
    """

    image_ids: Tensor
    text_image_ids: Tensor
    image_inputs: dict[str, ModelInputs] = field(default_factory=dict)
    text_inputs: dict[str, ModelInputs] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> RetrievalBatch:
        """A copy with every tensor on `device`."""
        return RetrievalBatch(
            image_ids=self.image_ids.to(device),
            text_image_ids=self.text_image_ids.to(device),
            image_inputs={m: {k: v.to(device) for k, v in d.items()} for m, d in self.image_inputs.items()},
            text_inputs={m: {k: v.to(device) for k, v in d.items()} for m, d in self.text_inputs.items()},
        )
