"""Loss edges, one family per file; `LOSSES` imports every module here on first lookup."""

from distill.losses.base import EdgeContext, EdgeLoss

__all__ = ["EdgeContext", "EdgeLoss"]
