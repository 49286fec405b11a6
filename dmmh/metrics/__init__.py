"""Retrieval metrics: functional forms and torchmetrics classes."""

from dmmh.metrics.functional import hamming_distance, mean_average_precision
from dmmh.metrics.retrieval import RetrievalMAP

__all__ = ["hamming_distance", "mean_average_precision", "RetrievalMAP"]
