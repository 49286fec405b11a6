"""Feature datasets and the DataModule base shared by every benchmark.

A :class:`FeatureDataModule` holds three splits of pre-extracted features — ``train``,
``query`` and ``database`` — each an ``(image, text, label)`` triple of arrays with one row
per item. Batches are dicts ``{"image", "text", "label", "index"}``; validation and test
iterate over two loaders, ``[query, database]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dmmh.data.query_database import QueryDatabaseDataset

__all__ = ["Split", "FeatureDataset", "FeatureDataModule", "SPLITS"]

SPLITS = ("train", "query", "database")


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
    """Rows of a :class:`Split` as ``{"image", "text", "label", "index"}`` float32 tensors."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.split
        return {
            "image": torch.as_tensor(np.asarray(s.image[i], dtype=np.float32)),
            "text": torch.as_tensor(np.asarray(s.text[i], dtype=np.float32)),
            "label": torch.as_tensor(np.asarray(s.label[i], dtype=np.float32)),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # one read per batch (memory maps and HDF5 datasets want sorted, unique indices)
        idx = np.asarray(indices, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        cols = {k: np.asarray(getattr(self.split, k)[uniq], dtype=np.float32) for k in ("image", "text", "label")}
        return [
            {k: torch.from_numpy(cols[k][j]) for k in cols} | {"index": torch.tensor(int(i))}
            for i, j in zip(idx, inverse)
        ]


class FeatureDataModule(L.LightningDataModule):
    """Base DataModule: subclasses implement :meth:`load_splits`.

    Args:
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        eval_batch_size: batch size for query / database encoding.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
    """

    def __init__(self, batch_size: int = 256, eval_batch_size: int = 1024, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self._splits: dict[str, Split] | None = None

    def load_splits(self) -> dict[str, Split]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, Split]:
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

    def dataset(self, split: str) -> FeatureDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return FeatureDataset(self.splits[split])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=g if shuffle else None,
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader("query", False), self._loader("database", False)]

    def test_dataloader(self) -> DataLoader:
        """Query items then database items in one loader, tagged with ``"role"``: metrics are logged once."""
        items = QueryDatabaseDataset(self.dataset("query"), self.dataset("database"))
        return DataLoader(items, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
