"""torchmetrics wrapper: accumulate query and database codes, compute mAP (or every metric) once.

It does not go through torchmetrics' retrieval mAP, which ignores items whose score is <= 0
(DESIGN.md §3). States are concatenated across processes under DDP; items are identified by
their dataset index, so duplicates added by a distributed sampler's padding are dropped and the
database keeps its original order (which breaks ties).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dmmh._checks import check_labels
from dmmh.metrics.functional import _check_options, as_bits, mean_average_precision, retrieval_metrics

__all__ = ["RetrievalMAP"]

ROLES = ("query", "database")


class RetrievalMAP(Metric):
    """mAP of Hamming ranking between a query set and a database set.

    ``update(codes, labels, indexes, role)`` with ``role`` ``"query"`` or ``"database"``;
    ``indexes`` are the items' positions in their split. ``compute()`` returns mAP@``top_k``
    (options as in :mod:`dmmh.metrics.functional`); :meth:`compute_all` returns every metric.
    Computation runs where the states live (numpy backend on CPU, torch elsewhere).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, top_k: int | None = None, empty: str = "zero", normalizer: str = "retrieved", **kwargs):
        super().__init__(**kwargs)
        _check_options(empty, normalizer)
        self.top_k, self.empty, self.normalizer = top_k, empty, normalizer
        for role in ROLES:
            for part in ("codes", "labels", "indexes"):
                self.add_state(f"{role}_{part}", default=[], dist_reduce_fx="cat")

    def update(self, codes: Tensor, labels: Tensor, indexes: Tensor, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not (len(codes) == len(labels) == len(indexes)):
            raise ValueError(f"codes, labels and indexes differ in length: {len(codes)}, {len(labels)}, {len(indexes)}")
        check_labels(labels, f"{role} labels")  # before the uint8 cast, which would truncate 0.5 to 0
        getattr(self, f"{role}_codes").append(as_bits(codes, f"{role} codes").to(torch.uint8))
        getattr(self, f"{role}_labels").append(labels.to(torch.uint8))
        getattr(self, f"{role}_indexes").append(indexes.to(torch.int64))

    def _gathered(self, role: str) -> tuple[Tensor, Tensor]:
        parts = [getattr(self, f"{role}_{p}") for p in ("codes", "labels", "indexes")]
        if isinstance(parts[0], list) and not parts[0]:
            raise ValueError(f"RetrievalMAP: no {role} items were added")
        codes, labels, idx = (dim_zero_cat(p) for p in parts)
        idx, first = _unique_first(idx)
        return codes[first].bool(), labels[first]

    def _inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q_codes, q_labels = self._gathered("query")
        db_codes, db_labels = self._gathered("database")
        return q_codes, db_codes, q_labels, db_labels

    def compute(self) -> Tensor:
        value = mean_average_precision(*self._inputs(), self.top_k, self.empty, normalizer=self.normalizer)
        return torch.tensor(value, dtype=torch.float64)

    def compute_all(self, **options) -> dict:
        """Every metric of :func:`~dmmh.metrics.functional.retrieval_metrics` (synced under DDP)."""
        options = {"empty": self.empty, "normalizer": self.normalizer} | options
        with self.sync_context(self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            return retrieval_metrics(*self._inputs(), **options)


def _unique_first(idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``idx`` and, for each, the position of its first occurrence."""
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    pos = torch.arange(len(idx), device=idx.device)
    first = torch.full((len(uniq),), len(idx), dtype=torch.int64, device=idx.device).scatter_reduce(0, inverse, pos, "amin")
    return uniq, first
