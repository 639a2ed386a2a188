"""Evaluation: retrieval recall, model efficiency and the comparison report."""
