"""distill: cross-modal, multi-teacher knowledge distillation of image-text retrieval models.

An experiment is a graph: nodes are encoder outputs (`teacher.image`, `student.text`, ...),
edges are registered loss modules between them. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
