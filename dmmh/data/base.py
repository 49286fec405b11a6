"""Feature datasets and the DataModule base shared by every benchmark.

A :class:`FeatureDataModule` holds three splits of pre-extracted features — ``train``,
``query`` and ``database`` — each an ``(image, text, label)`` triple of arrays with one row
per item. Batches are dicts ``{"image", "text", "label", "index"}``; validation and test
iterate over one loader of query items then database items, whose batches also carry ``"role"``
(:class:`~dmmh.data.query_database.QueryDatabaseDataset`), so each metric is logged once.

Besides the three splits, ``fit`` uses three roles (:data:`ROLES`): it trains on ``"fit"``
and validates ``"val_query"`` against ``"val_database"``; ``test`` (and ``predict``) encodes
``"query"`` against ``"database"``. By default (``val_split=0.1``) a seeded 10 % of the
training items is held out: they are the validation queries, the other 90 % are both the
items trained on and the validation database, so ``fit`` never reads a test item.
``val_split="test"`` is the literature's practice (validation on the test queries and
database: checkpoints are then *selected on test*, and :attr:`FeatureDataModule.validation`
says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from dmmh.data.query_database import QueryDatabaseDataset

__all__ = ["Split", "FeatureDataset", "FeatureDataModule", "EpochShuffle", "SPLITS", "ROLES", "hold_out", "VAL_SPLIT"]

SPLITS = ("train", "query", "database")
ROLES = ("fit", "val_query", "val_database", *SPLITS)
VAL_SPLIT = 0.1  # the default: 10 % of the training items are the validation queries
SELECTED_ON_TEST = "selected on test"


@dataclass
class Split:
    """One split: ``image (N, Di)``, ``text (N, Dt)``, multi-hot ``label (N, C)`` arrays."""

    image: np.ndarray
    text: np.ndarray
    label: np.ndarray

    def __post_init__(self):
        n = {len(self.image), len(self.text), len(self.label)}
        if len(n) != 1:
            raise ValueError(f"row counts differ: image {len(self.image)}, text {len(self.text)}, label {len(self.label)}")

    def __len__(self) -> int:
        return len(self.label)


class FeatureDataset(Dataset):
    """Rows of a :class:`Split` as ``{"image", "text", "label", "index"}`` float32 tensors.

    ``rows`` selects the split's rows served (default: all, in order); ``index`` is the item's
    row in the split (unique, so evaluation can drop a distributed sampler's duplicates)."""

    def __init__(self, split: Split, rows: np.ndarray | None = None):
        self.split = split
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.split) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # one read per batch (memory maps and HDF5 datasets want sorted, unique indices)
        idx = np.asarray(indices, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(self))]
        if len(bad):
            raise IndexError(f"item {int(bad[0])} out of range: the dataset has {len(self)} items")
        source = idx if self.rows is None else self.rows[idx]
        uniq, inverse = np.unique(source, return_inverse=True)
        cols = {k: np.asarray(getattr(self.split, k)[uniq], dtype=np.float32) for k in ("image", "text", "label")}
        return [
            {k: torch.from_numpy(cols[k][j]) for k in cols} | {"index": torch.tensor(int(r))}
            for r, j in zip(source, inverse)
        ]


class EpochShuffle(Sampler[int]):
    """Each pass a permutation of ``range(n)`` drawn from ``(seed, epoch)``: every item is seen
    once per epoch, and epoch ``e``'s order does not depend on the epochs before it (a run
    resumed from a checkpoint sees the same order). Lightning calls :meth:`set_epoch` before
    each epoch (through its distributed wrapper too); passes without it count on by one."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self._next: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self._next = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch = self._next if self._next is not None else self.epoch
        self.epoch, self._next = epoch, epoch + 1
        return iter(np.random.default_rng([self.seed, epoch]).permutation(self.n).tolist())


def hold_out(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: sorted positions of ``n`` training items, ``val`` a seeded random
    ``val_split`` of them (a fraction when < 1, at least one item; a count when >= 1), ``train``
    the rest. ``val_split=0`` holds nothing out."""
    k = _val_count(n, val_split)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _val_count(n: int, val_split: float) -> int:
    if val_split == 0:
        return 0
    k = max(1, int(round(val_split * n))) if val_split < 1 else int(val_split)
    if k >= n:
        raise ValueError(f"val_split={val_split} holds out {k} of the {n} training items and leaves none to train on; "
                         f"pass a smaller val_split, or val_split=0 (no validation)")
    return k


def _check_val_split(val_split) -> float | str:
    if isinstance(val_split, str):
        if val_split != "test":
            raise ValueError(f"val_split must be a fraction in [0, 1), a whole count >= 1, or 'test'; got {val_split!r}")
        return val_split
    v = float(val_split)
    if not (0 <= v < 1 or (v >= 1 and v == int(v))):
        raise ValueError(f"val_split must be a fraction in [0, 1), a whole count >= 1, or 'test'; got {val_split!r}")
    return v


class FeatureDataModule(L.LightningDataModule):
    """Base DataModule: subclasses implement :meth:`load_splits`.

    Args:
        batch_size: training batch size (evaluation uses ``eval_batch_size``). Every training
            item is seen once per epoch, in an order drawn from ``(seed, epoch)``; the last,
            smaller batch is kept, unless it would hold a single item (batch norm cannot train
            on one item), which is then left out of that epoch.
        eval_batch_size: batch size for query / database encoding.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        val_split: the validation queries ``fit`` uses: a fraction (< 1) or a count (>= 1) of the
            training items, drawn with ``val_seed`` and removed from training; the remaining
            training items are the validation database. Default ``0.1``. ``0``: no validation.
            ``"test"``: validate on the test queries and database (the published papers'
            practice; the model is then *selected on test*).
        val_seed: seed of the validation split (fixed across training seeds by default).
    """

    def __init__(self, batch_size: int = 256, eval_batch_size: int = 1024, num_workers: int = 0, seed: int = 0,
                 val_split: Union[float, Literal["test"]] = VAL_SPLIT, val_seed: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.val_split, self.val_seed = _check_val_split(val_split), int(val_seed)
        self._splits: dict[str, Split] | None = None
        self._held_out: tuple[np.ndarray, np.ndarray] | None = None

    def load_splits(self) -> dict[str, Split]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, Split]:
        """The source splits ``train``, ``query``, ``database`` as read (see :meth:`rows` for roles)."""
        if self._splits is None:
            splits = self.load_splits()
            missing = [s for s in SPLITS if s not in splits]
            if missing:
                raise ValueError(f"{type(self).__name__}.load_splits() lacks split(s) {missing}")
            self._check_widths(splits)
            self._splits = splits
        return self._splits

    @staticmethod
    def _check_widths(splits: dict[str, Split]) -> None:
        for part in ("image", "text", "label"):
            widths = {name: getattr(s, part).shape[1] for name, s in splits.items()}
            if len(set(widths.values())) != 1:
                raise ValueError(f"{part} widths differ between splits: {widths}")

    # widths, read by LightningCLI to build the model
    @property
    def image_dim(self) -> int:
        return int(self.splits["train"].image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.splits["train"].text.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.splits["train"].label.shape[1])

    # -- roles ---------------------------------------------------------------------------------
    def rows(self, role: str) -> tuple[str, np.ndarray | None]:
        """The split serving ``role`` (one of :data:`ROLES`) and its rows there (``None``: all)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role in SPLITS:
            return role, None
        if self.val_split == "test":
            return {"fit": ("train", None), "val_query": ("query", None), "val_database": ("database", None)}[role]
        if self._held_out is None:
            self._held_out = hold_out(len(self.splits["train"]), self.val_split, self.val_seed)
        train, val = self._held_out
        return "train", {"fit": train, "val_query": val, "val_database": train}[role]

    def num_items(self, role: str) -> int:
        split, rows = self.rows(role)
        return len(self.splits[split]) if rows is None else len(rows)

    @property
    def validation(self) -> str:
        """How ``fit`` validates (and so selects checkpoints), in words; logged and saved by
        :class:`~dmmh.models.DMMHModule` with the run's hyperparameters."""
        if self.val_split == "test":
            return (f"{SELECTED_ON_TEST}: validation uses the test queries against the test database "
                    f"(val_split='test', the published papers' protocol)")
        n = len(self.splits["train"])
        if self.val_split == 0:
            return f"none: no validation; trained on all {n} training items (val_split=0)"
        k = self.num_items("val_query")
        return (f"held out: {k} of the {n} training items (val_split={self.val_split:g}, val_seed={self.val_seed}) "
                f"as queries against the other {n - k}, which are trained on; test data unused by fit")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.val_split == "test":
            rank_zero_warn(f"{type(self).__name__}: {self.validation}. Report results as '{SELECTED_ON_TEST}'; "
                           f"the default val_split holds out training items instead.")

    def dataset(self, role: str) -> FeatureDataset:
        """The items of ``role``: a split, or a role of ``fit`` (see :data:`ROLES`)."""
        split, rows = self.rows(role)
        return FeatureDataset(self.splits[split], rows)

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, role: str) -> DataLoader:
        data = self.dataset(role)
        if role != "fit":
            return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        n = len(data)
        lone = n > 1 and n % self.batch_size == 1  # a last batch of one item breaks batch norm: leave it out
        if lone:
            rank_zero_info(f"{type(self).__name__}: {n} training items in batches of {self.batch_size} leave a last "
                           f"batch of one, which batch norm cannot train on; that item (another each epoch) sits the "
                           f"epoch out")
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochShuffle(n, self.seed), drop_last=lone,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit")

    def _query_database_loader(self, query: str, database: str) -> DataLoader:
        """Query items then database items in one loader, tagged with ``"role"``: metrics are logged once."""
        items = QueryDatabaseDataset(self.dataset(query), self.dataset(database))
        return DataLoader(items, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_split == 0 else self._query_database_loader("val_query", "val_database")

    def test_dataloader(self) -> DataLoader:
        return self._query_database_loader("query", "database")

    def predict_dataloader(self) -> list[DataLoader]:
        """Two loaders, ``[query, database]``: ``trainer.predict`` returns one list of batches per split."""
        return [self._loader("query"), self._loader("database")]
