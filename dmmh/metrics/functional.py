"""Retrieval metrics on binary codes (simple exact version; see DESIGN.md §3).

Codes may be ±1, relaxed (the sign is taken, ``x >= 0 → 1``) or any real values.
Relevance: query and item share at least one label. Ranking: ascending Hamming
distance, ties broken by database index (stable sort).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hamming_distance", "mean_average_precision"]


def _bits(codes: Tensor) -> Tensor:
    return (codes >= 0).to(torch.float32)


def hamming_distance(query: Tensor, database: Tensor) -> Tensor:
    """Integer Hamming distances ``(Q, N)`` between the sign bits of two code matrices."""
    if query.shape[1] != database.shape[1]:
        raise ValueError(f"code lengths differ: query {query.shape[1]} bits, database {database.shape[1]} bits")
    q, d = _bits(query), _bits(database)
    return (q @ (1 - d).T + (1 - q) @ d.T).round().to(torch.int64)


def mean_average_precision(
    query_codes: Tensor,
    database_codes: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    top_k: int | None = None,
    empty: str = "zero",
    chunk: int = 256,
) -> float:
    """mAP@``top_k`` (all items when ``None``) of Hamming ranking.

    ``empty`` says what a query with no relevant item in the ranked list counts as: ``"zero"``
    (AP 0, the Python ports) or ``"exclude"`` (left out of the mean, the MATLAB code).
    AP@k is normalised by the relevant items found in the top k (DeepHash style).
    """
    if empty not in ("zero", "exclude"):
        raise ValueError(f"empty must be 'zero' or 'exclude', got {empty!r}")
    if query_labels.shape[1] != database_labels.shape[1]:
        raise ValueError(f"label widths differ: query {query_labels.shape[1]}, database {database_labels.shape[1]}")
    if len(query_codes) == 0 or len(database_codes) == 0:
        raise ValueError(f"need at least one query and one database item, got {len(query_codes)} and {len(database_codes)}")
    k = len(database_codes) if top_k is None else min(int(top_k), len(database_codes))
    aps: list[Tensor] = []
    yd = database_labels.to(torch.float32)
    for start in range(0, len(query_codes), chunk):
        dist = hamming_distance(query_codes[start : start + chunk], database_codes)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        rel = (query_labels[start : start + chunk].to(torch.float32) @ yd.T > 0).to(torch.float64)
        rel = torch.gather(rel, 1, order)
        hits = rel.cumsum(1)
        ranks = torch.arange(1, k + 1, dtype=torch.float64)
        found = rel.sum(1)
        ap = (hits / ranks * rel).sum(1) / found.clamp(min=1)
        aps.append(torch.where(found > 0, ap, torch.full_like(ap, float("nan"))))
    ap = torch.cat(aps)
    valid = ~torch.isnan(ap)
    if empty == "zero":
        return float(torch.nan_to_num(ap, nan=0.0).mean())
    return float(ap[valid].mean()) if bool(valid.any()) else 0.0
