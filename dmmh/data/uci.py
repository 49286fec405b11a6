"""``uci_mfeat``: the UCI "Multiple Features" handwritten digits, embedded in dmmh (no download).

2,000 digits '0'..'9' (200 per class) described by six real feature views (CC BY 4.0; source,
citation and licence in ``dmmh/data/embedded/UCI_MFEAT_CITATION.txt``):

======  =====  ==========================================
view    width  content
======  =====  ==========================================
fou        76  Fourier coefficients of the character shapes
fac       216  profile correlations
kar        64  Karhunen–Loève coefficients
pix       240  pixel averages in 2 x 3 windows
zer        47  Zernike moments
mor         6  morphological features
======  =====  ==========================================

Two views play the two modalities (default: ``pix`` as "image", ``fou`` as "text"). Labels are
one-hot (10 classes). The split is stratified and seeded: for each class, its 200 digits are
permuted by ``numpy.random.default_rng(split_seed)`` (one generator, classes in order 0..9); the
first ``query_per_class`` become queries, the rest the database, and the first
``train_per_class`` database items of each class the training set (train ⊂ database, queries
disjoint from both, as in the benchmarks). Defaults: 200 queries, 1,800 database, 1,000 train.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
from importlib import resources
from typing import Literal, Union

import numpy as np

from dmmh.data.base import VAL_SPLIT, FeatureDataModule, Split
from dmmh.data.normalize import normalize_splits
from dmmh.registry import DATAMODULES

__all__ = ["UCIMultipleFeatures", "load_uci_mfeat", "UCI_VIEWS"]

UCI_VIEWS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
ARCHIVE = "uci_mfeat.tar.xz"
ARCHIVE_SHA256 = "e90261c74020d9d545cce3855e3ec4eebf2611176f9a7ce81b3fe6998c0d9aca"
PER_CLASS, N_CLASSES = 200, 10


@functools.lru_cache(maxsize=1)
def load_uci_mfeat() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All six views ``{name: (2000, width) float64}`` and the class of each digit ``(2000,) int64``,
    rows in the file order (class 0's 200 digits first). Checked against the archive's SHA-256."""
    ref = resources.files("dmmh.data").joinpath("embedded").joinpath(ARCHIVE)
    raw = ref.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise ValueError(f"{ref}: SHA-256 is {digest}, expected {ARCHIVE_SHA256}; the embedded data is damaged")
    views, labels = {}, None
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:xz") as tar:
        for name, width in UCI_VIEWS.items():
            table = np.loadtxt(tar.extractfile(f"mfeat-{name}.csv"), delimiter=",", skiprows=1, dtype=np.float64)
            if table.shape != (PER_CLASS * N_CLASSES, width + 1):
                raise ValueError(f"{ref}: mfeat-{name}.csv has shape {table.shape}, expected {(2000, width + 1)}")
            views[name] = table[:, :-1]
            view_labels = table[:, -1].astype(np.int64)
            if labels is not None and not np.array_equal(labels, view_labels):
                raise ValueError(f"{ref}: mfeat-{name}.csv lists other classes than mfeat-fou.csv")
            labels = view_labels
    return views, labels


def stratified_split(labels: np.ndarray, query_per_class: int, train_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Row indices of ``query``, ``database`` and ``train`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"query": [], "database": [], "train": []}
    for c in range(int(labels.max()) + 1):
        rows = rng.permutation(np.flatnonzero(labels == c))
        parts["query"].append(rows[:query_per_class])
        parts["database"].append(rows[query_per_class:])
        parts["train"].append(rows[query_per_class : query_per_class + train_per_class])
    return {k: np.concatenate(v) for k, v in parts.items()}


@DATAMODULES.register("uci_mfeat", aliases=("uci", "mfeat", "uci_multiple_features"))
class UCIMultipleFeatures(FeatureDataModule):
    """The embedded UCI Multiple Features digits as a two-modality retrieval benchmark.

    Args:
        image_view, text_view: the views used as the two modalities (see :data:`UCI_VIEWS`).
        query_per_class, train_per_class: split sizes per class (of 200 digits).
        split_seed: seed of the split.
        normalize: feature normalisation fitted on the train split (see
            :mod:`dmmh.data.normalize`); the views' scales differ by orders of magnitude.
        batch_size, eval_batch_size, num_workers, seed, val_split, val_seed: see
            :class:`~dmmh.data.base.FeatureDataModule` (by default 10 % of the training digits, 100,
            are held out as validation queries against the other 900).
    """

    def __init__(
        self,
        image_view: str = "pix",
        text_view: str = "fou",
        query_per_class: int = 20,
        train_per_class: int = 100,
        split_seed: int = 0,
        normalize: str | dict[str, str] = "zscore",
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        val_split: Union[float, Literal["test"]] = VAL_SPLIT,
        val_seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                         val_split=val_split, val_seed=val_seed)
        for arg, view in (("image_view", image_view), ("text_view", text_view)):
            if view not in UCI_VIEWS:
                raise ValueError(f"{arg} must be one of {sorted(UCI_VIEWS)}, got {view!r}")
        if not 1 <= query_per_class < PER_CLASS:
            raise ValueError(f"query_per_class must be in [1, {PER_CLASS - 1}], got {query_per_class}")
        if not 1 <= train_per_class <= PER_CLASS - query_per_class:
            raise ValueError(
                f"train_per_class must be in [1, {PER_CLASS - query_per_class}] (the database items per class), "
                f"got {train_per_class}"
            )
        self.save_hyperparameters()

    def load_splits(self) -> dict[str, Split]:
        h = self.hparams
        views, classes = load_uci_mfeat()
        onehot = np.eye(N_CLASSES, dtype=np.float32)[classes]
        rows = stratified_split(classes, h["query_per_class"], h["train_per_class"], h["split_seed"])
        image, text = views[h["image_view"]].astype(np.float32), views[h["text_view"]].astype(np.float32)
        splits = {name: Split(image[r], text[r], onehot[r]) for name, r in rows.items()}
        return normalize_splits(splits, h["normalize"])
