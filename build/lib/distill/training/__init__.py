"""Training: the LightningModule, `fit`, stages, sweeps, checkpoints and the teacher cache.

Kept empty so that `distill.training.checkpoint` (read by the deploy commands) loads
without Lightning."""
