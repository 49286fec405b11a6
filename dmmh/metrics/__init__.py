"""Retrieval metrics: functional forms, the torchmetrics class, and reports (``dmmh report``)."""

from dmmh.metrics.functional import (
    hamming_distance,
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    precision_within_radius,
    recall_at_k,
    retrieval_metrics,
)
from dmmh.metrics.retrieval import RetrievalMAP

__all__ = [
    "hamming_distance",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "precision_recall_curve",
    "precision_within_radius",
    "retrieval_metrics",
    "RetrievalMAP",
]
