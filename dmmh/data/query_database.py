"""The query and the database items as one dataset, each item tagged with its role.

Lightning reports an evaluation metric once per dataloader: with ``[query, database]`` loaders,
``test/mAP`` is printed twice and ``trainer.test()`` returns two identical dicts. One loader over
:class:`QueryDatabaseDataset` gives one; :class:`~dmmh.models.lit.DMMHModule` reads ``"role"``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["QueryDatabaseDataset", "ROLES"]

ROLES = ("query", "database")  # the value of an item's "role" is its position here


class QueryDatabaseDataset(Dataset):
    """The items of ``query`` then those of ``database``, each a dict to which ``"role"`` is added (0 query,
    1 database); ``"index"`` stays the item's position in its own split."""

    def __init__(self, query: Dataset, database: Dataset):
        self.parts = (query, database)
        self.starts = np.cumsum([0, len(query), len(database)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # one batched read per part (FeatureDataset reads memory maps and HDF5 once per batch)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items (query, then database)")
        role = np.searchsorted(self.starts, idx, side="right") - 1
        out: list = [None] * len(idx)
        for r, part in enumerate(self.parts):
            where = np.flatnonzero(role == r)
            if not where.size:
                continue
            local = (idx[where] - self.starts[r]).tolist()
            items = part.__getitems__(local) if hasattr(part, "__getitems__") else [part[j] for j in local]
            for k, item in zip(where, items):
                out[k] = {**item, "role": torch.tensor(r, dtype=torch.int64)}
        return out
