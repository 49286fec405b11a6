"""Input validation shared by every component: clear errors instead of silent wrong results."""

from __future__ import annotations

import torch
from torch import Tensor


def check_features(x: Tensor, expected_dim: int, what: str) -> None:
    """``x`` must be a finite float matrix ``(B, expected_dim)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected shape (batch, {expected_dim}), got {tuple(x.shape)}")
    if x.shape[1] != expected_dim:
        raise ValueError(
            f"{what}: feature width {x.shape[1]} differs from the {expected_dim} the encoder was built for "
            f"(shape {tuple(x.shape)})"
        )
    check_finite(x, what)


def check_finite(x: Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{what}: contains NaN or inf (first at index {tuple(bad)})")


def check_labels(y: Tensor, what: str = "label", n_classes: int | None = None) -> None:
    """``y`` must be a multi-hot {0, 1} matrix ``(B, C)``."""
    if y.ndim != 2:
        raise ValueError(f"{what}: expected multi-hot shape (batch, classes), got {tuple(y.shape)}")
    if n_classes is not None and y.shape[1] != n_classes:
        raise ValueError(f"{what}: {y.shape[1]} classes, expected {n_classes} (shape {tuple(y.shape)})")
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"{what}: labels must be 0/1 (multi-hot); found {y[row, col].item()!r} at row {row}, column {col}")


def check_same_batch(named: dict[str, Tensor | None]) -> int:
    """All present tensors share their first dimension; returns it."""
    sizes = {k: v.shape[0] for k, v in named.items() if v is not None}
    if not sizes:
        raise ValueError(f"expected at least one of {', '.join(named)}, got none")
    if len(set(sizes.values())) > 1:
        raise ValueError("batch sizes differ between modalities: " + ", ".join(f"{k}={n}" for k, n in sizes.items()))
    return next(iter(sizes.values()))
