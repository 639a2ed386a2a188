"""What the user has said they trust, for the whole command: `distill --trust-checkpoint`.

Checkpoints are data: their stored config is refused when it would run code once loaded
(`plugins:` imports, `pipe:` data URLs) unless `TRUST.checkpoints` is on
(`distill.training.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Trust:
    """Switches the CLI sets from its flags; off by default."""

    checkpoints: bool = False


TRUST = Trust()
