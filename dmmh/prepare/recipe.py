"""What a dataset recipe produces (items, bag-of-words text, multi-hot labels, the counts after each
filtering step) and the seeded query / database / train split shared by the three recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Recipe", "SplitSizes", "split_items"]


@dataclass(frozen=True)
class SplitSizes:
    """Published split sizes. ``database=None``: every item that is not a query; otherwise exactly
    ``database`` items and the rest is left out (``unused`` in the manifest). Train ⊂ database."""

    query: int
    database: int | None
    train: int


@dataclass
class Recipe:
    """One dataset after its recipe: row ``i`` of ``text`` / ``labels`` is the item whose image is
    ``images[i]`` (relative to the raw folder) and whose id in the release is ``ids[i]``."""

    dataset: str
    version: int
    params: dict
    ids: list[int]
    id_meaning: str
    images: list[str]
    text: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    vocabulary: list[str]
    counts: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def keep(self, mask: np.ndarray, step: str) -> None:
        """Keep the items where ``mask`` is true and record the count after ``step``."""
        mask = np.asarray(mask, dtype=bool)
        idx = np.flatnonzero(mask)
        self.ids = [self.ids[i] for i in idx]
        self.images = [self.images[i] for i in idx]
        self.text, self.labels = self.text[idx], self.labels[idx]
        self.counts.append({"step": step, "items": len(idx)})

    def __len__(self) -> int:
        return len(self.ids)


def split_items(n: int, sizes: SplitSizes, seed: int) -> dict[str, np.ndarray]:
    """Row indices (ascending) of the ``query``, ``database``, ``train`` and ``unused`` items.

    ``numpy.random.default_rng(seed)``: a permutation of the ``n`` items gives the queries (its
    first ``query`` entries), then the database (the next ``database`` entries, or all the rest);
    a second permutation of the database gives the train items (its first ``train`` entries).
    """
    db_n = n - sizes.query if sizes.database is None else sizes.database
    if min(sizes.query, db_n, sizes.train) < 0 or sizes.query + db_n > n or sizes.train > db_n:
        database = "rest" if sizes.database is None else sizes.database
        raise ValueError(f"split sizes query={sizes.query}, database={database}, "
                         f"train={sizes.train} do not fit the {n} items kept by the recipe (query + database <= items, "
                         f"train <= database)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    query, database = perm[: sizes.query], perm[sizes.query : sizes.query + db_n]
    train = database[rng.permutation(db_n)[: sizes.train]]
    unused = perm[sizes.query + db_n :]
    return {name: np.sort(a).astype(np.int64) for name, a in
            (("query", query), ("database", database), ("train", train), ("unused", unused))}
