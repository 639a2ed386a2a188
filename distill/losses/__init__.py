"""Loss edges. Each family lives in its own file; importing this package registers them."""

from distill.losses import contrastive, ensemble, feature, fused, hard_negative, itm, similarity  # noqa: F401
from distill.losses._base import EdgeContext, EdgeLoss

__all__ = ["EdgeContext", "EdgeLoss"]
