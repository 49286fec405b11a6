"""torchmetrics wrapper: accumulate query and database codes, compute mAP once.

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

from dmmh.metrics.functional import mean_average_precision

__all__ = ["RetrievalMAP"]

ROLES = ("query", "database")


class RetrievalMAP(Metric):
    """mAP of Hamming ranking between a query set and a database set.

    ``update(codes, labels, indexes, role)`` with ``role`` ``"query"`` or ``"database"``;
    ``indexes`` are the items' positions in their split. ``compute()`` returns the mAP.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, top_k: int | None = None, empty: str = "zero", **kwargs):
        super().__init__(**kwargs)
        self.top_k, self.empty = top_k, empty
        for role in ROLES:
            for part in ("codes", "labels", "indexes"):
                self.add_state(f"{role}_{part}", default=[], dist_reduce_fx="cat")

    def update(self, codes: Tensor, labels: Tensor, indexes: Tensor, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not (len(codes) == len(labels) == len(indexes)):
            raise ValueError(f"codes, labels and indexes differ in length: {len(codes)}, {len(labels)}, {len(indexes)}")
        getattr(self, f"{role}_codes").append((codes >= 0).to(torch.uint8))
        getattr(self, f"{role}_labels").append(labels.to(torch.uint8))
        getattr(self, f"{role}_indexes").append(indexes.to(torch.int64))

    def _gathered(self, role: str) -> tuple[Tensor, Tensor]:
        parts = [getattr(self, f"{role}_{p}") for p in ("codes", "labels", "indexes")]
        if isinstance(parts[0], list) and not parts[0]:
            raise ValueError(f"RetrievalMAP: no {role} items were added")
        codes, labels, idx = (dim_zero_cat(p) for p in parts)
        idx, first = _unique_first(idx)
        return codes[first].float() * 2 - 1, labels[first]

    def compute(self) -> Tensor:
        q_codes, q_labels = self._gathered("query")
        db_codes, db_labels = self._gathered("database")
        value = mean_average_precision(q_codes.cpu(), db_codes.cpu(), q_labels.cpu(), db_labels.cpu(), self.top_k, self.empty)
        return torch.tensor(value, dtype=torch.float64)


def _unique_first(idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``idx`` and, for each, the position of its first occurrence."""
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    pos = torch.arange(len(idx), device=idx.device)
    first = torch.full((len(uniq),), len(idx), dtype=torch.int64, device=idx.device).scatter_reduce(0, inverse, pos, "amin")
    return uniq, first
