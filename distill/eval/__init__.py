"""Evaluation: retrieval recall, model efficiency and the comparison report."""

from distill.eval.efficiency import (
    count_parameters,
    encode_latency_ms,
    file_size_mb,
    peak_memory_mb,
)
from distill.eval.report import format_table, metrics_to_row, write_report
from distill.eval.retrieval import RetrievalRecall, encode_loader, retrieval_metrics

__all__ = [
    "RetrievalRecall",
    "count_parameters",
    "encode_latency_ms",
    "encode_loader",
    "file_size_mb",
    "format_table",
    "metrics_to_row",
    "peak_memory_mb",
    "retrieval_metrics",
    "write_report",
]
