"""Feature normalisation for :class:`~dmmh.data.base.Split` dicts, fitted on the train split.

Methods: ``"none"``; ``"l2"`` (each row to unit Euclidean norm); ``"zscore"`` (each column to
zero mean and unit standard deviation with the train split's statistics; constant columns are
only centred); ``"minmax"`` (each column to [0, 1] on the train split's range; constant columns
become 0). In-memory arrays are normalised once; memory-mapped arrays are wrapped in a
:class:`RowTransform` that normalises the rows as they are read, so nothing large is copied.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from dmmh.data.base import Split

__all__ = ["NORMALIZATIONS", "RowTransform", "normalize_splits", "column_stats"]

NORMALIZATIONS = ("none", "l2", "zscore", "minmax")
_BLOCK_ROWS = 8192


class RowTransform:
    """A read-only 2-D array view whose rows are passed through ``fn`` (float32) when indexed."""

    def __init__(self, base: Any, fn: Callable[[np.ndarray], np.ndarray]):
        self.base, self.fn = base, fn
        self.shape = tuple(base.shape)
        self.ndim, self.dtype = 2, np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.fn(np.asarray(self.base[index], dtype=np.float32))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def column_stats(a: Any) -> dict[str, np.ndarray]:
    """Column mean, standard deviation, min and max of ``a`` (float64, read block by block)."""
    n, d = a.shape
    if n == 0:
        raise ValueError("cannot fit a normalisation on an empty train split")
    s, ss = np.zeros(d), np.zeros(d)
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    for start in range(0, n, _BLOCK_ROWS):
        block = np.asarray(a[start : start + _BLOCK_ROWS], dtype=np.float64)
        s += block.sum(0)
        lo, hi = np.minimum(lo, block.min(0)), np.maximum(hi, block.max(0))
    mean = s / n
    for start in range(0, n, _BLOCK_ROWS):  # second pass: numerically stable variance
        ss += ((np.asarray(a[start : start + _BLOCK_ROWS], dtype=np.float64) - mean) ** 2).sum(0)
    return {"mean": mean, "std": np.sqrt(ss / n), "min": lo, "max": hi}


def _make_fn(method: str, train: Any) -> Callable[[np.ndarray], np.ndarray]:
    if method == "l2":
        return lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
    st = column_stats(train)
    if method == "zscore":
        shift, scale = st["mean"], np.where(st["std"] > 0, st["std"], 1.0)
    else:  # minmax
        span = st["max"] - st["min"]
        shift, scale = st["min"], np.where(span > 0, span, np.inf)
    shift, inv = shift.astype(np.float32), (1.0 / scale).astype(np.float32)
    return lambda x: (x - shift) * inv


def _spec(normalize: str | Mapping[str, str]) -> dict[str, str]:
    spec = {"image": normalize, "text": normalize} if isinstance(normalize, str) else dict(normalize)
    unknown = set(spec) - {"image", "text"}
    if unknown:
        raise ValueError(f"normalize: keys must be 'image' and/or 'text', got {sorted(unknown)}")
    for modality, method in spec.items():
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalize[{modality!r}] must be one of {NORMALIZATIONS}, got {method!r}")
    return {m: spec.get(m, "none") for m in ("image", "text")}


def normalize_splits(splits: Mapping[str, Split], normalize: str | Mapping[str, str]) -> dict[str, Split]:
    """Normalise each modality of every split (``normalize``: one method, or one per modality)."""
    spec = _spec(normalize)
    fns = {m: None if method == "none" else _make_fn(method, getattr(splits["train"], m)) for m, method in spec.items()}
    out = {}
    for name, split in splits.items():
        parts = {}
        for m in ("image", "text"):
            a, fn = getattr(split, m), fns[m]
            if fn is None:
                parts[m] = a
            elif isinstance(a, np.memmap) or not isinstance(a, np.ndarray):
                parts[m] = RowTransform(a, fn)
            else:
                parts[m] = fn(np.asarray(a, dtype=np.float32))
        out[name] = Split(parts["image"], parts["text"], split.label)
    return out
